//! The last lines of a program's output or of the server log: enough to
//! say why `initdb` or the server failed, without pasting megabytes into
//! an error message.

use std::path::Path;

const TAIL_LINES: usize = 30;
const TAIL_BYTES: usize = 4000;

/// The last [`TAIL_LINES`] non-blank lines, cut at the front to
/// [`TAIL_BYTES`].
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if out.len() > TAIL_BYTES {
        let mut cut = out.len() - TAIL_BYTES;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out.replace_range(..cut, "…");
    }
    out
}

/// The tail of a finished program's stdout and stderr together.
pub(super) fn output_tail(stdout: &[u8], stderr: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(stdout).into_owned();
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(stderr));
    tail(&text)
}

/// The tail of the server log, or why it cannot be read.
pub(super) async fn log_tail(log: &Path) -> String {
    match tokio::fs::read(log).await {
        Ok(bytes) => format!(
            "last lines of {}:\n{}",
            log.display(),
            tail(&String::from_utf8_lossy(&bytes))
        ),
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text);
        assert!(t.ends_with("line 99"));
        assert!(!t.contains("line 69\n"));
        assert!(t.contains("line 70"));
    }
}
