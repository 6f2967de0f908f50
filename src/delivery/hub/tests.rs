use super::*;
use crate::delivery::park::{Delivery, Wire};
use crate::message::{Message, User};
use chrono::Utc;

/// A socket that takes nothing: these tests look at who is handed to the
/// delivery, not at what is written.
struct Nowhere;

impl Wire for Nowhere {
    fn try_write(&self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

fn park() -> Arc<Park> {
    Park::new(Arc::new(Nowhere))
}

fn snap(xmin: u64, xmax: u64, xip: &[u64]) -> Arc<Snapshot> {
    Arc::new(Snapshot::new(xmin, xmax, xip.to_vec()).unwrap())
}

fn msg(id: i64, room: i64, txid: u64) -> Arc<StoredMessage> {
    let m = Message {
        id,
        room,
        sender: User {
            id: 1,
            username: "a".into(),
            first_name: String::new(),
            last_name: String::new(),
        },
        content: format!("m{id}"),
        created_at: Utc::now(),
        edited: false,
    };
    Arc::new(StoredMessage::new(&m, txid))
}

fn ids(r: &HubRead) -> Vec<i64> {
    match r {
        HubRead::Due { rows, .. } => rows.iter().map(|m| m.id).collect(),
        HubRead::Nothing { .. } => vec![],
        HubRead::Unknown => panic!("unknown"),
    }
}

async fn catch_up(hub: &Hub, head: Arc<Snapshot>, rows: Vec<Arc<StoredMessage>>) {
    let _ = deliveries_of(hub, head, rows).await;
}

async fn deliveries_of(
    hub: &Hub,
    head: Arc<Snapshot>,
    rows: Vec<Arc<StoredMessage>>,
) -> Vec<Delivery> {
    hub.message_notified(1);
    let plan = hub.next_catchup().await;
    hub.finish_catchup(plan, caught(head, rows))
}

fn caught(head: Arc<Snapshot>, rows: Vec<Arc<StoredMessage>>) -> Caught {
    Caught {
        head,
        rows,
        revoked: Vec::new(),
        complete: true,
    }
}

fn woken(sub: &Subscription) -> bool {
    use futures::FutureExt;
    sub.notified().now_or_never().is_some()
}

#[tokio::test]
async fn parked_streams_get_their_rooms_rows_instead_of_a_wake_up() {
    let hub = started_hub(snap(10, 10, &[])).await;
    let poll = hub.subscribe(&[1], 1, None);
    let stream = hub.subscribe(&[1], 1, Some(Lag::new(8, None)));
    let park = park();
    stream.allow_parking(&park);
    catch_up(&hub, snap(10, 10, &[]), vec![]).await; // room 1 goes live
    let _ = (woken(&poll), woken(&stream));

    let d = deliveries_of(&hub, snap(11, 11, &[]), vec![msg(1, 1, 10)]).await;
    assert_eq!(d.len(), 1);
    assert_eq!(*d[0].lower, *snap(10, 10, &[]));
    assert_eq!(d[0].rows.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(d[0].parked.len(), 1);
    assert!(woken(&poll));
    assert!(!woken(&stream), "the delivery decides whether to wake it");

    // A catch-up that finds nothing for the room hands it nothing, and
    // the next delivery still covers everything since the room's last
    // rows: its lower snapshot is that batch, not the plan's.
    assert!(deliveries_of(&hub, snap(12, 12, &[]), vec![])
        .await
        .is_empty());
    let d = deliveries_of(&hub, snap(13, 13, &[]), vec![msg(2, 1, 12)]).await;
    assert_eq!(*d[0].lower, *snap(11, 11, &[]));

    // A membership change stops writes until the stream has checked.
    park.checking();
    hub.membership_changed(1, Some(1));
    assert!(woken(&stream));
    assert!(!park.park(&snap(13, 13, &[])));
}

#[tokio::test]
async fn a_loss_of_access_in_a_catchup_stops_that_users_parks_before_its_rows() {
    let hub = started_hub(snap(10, 10, &[])).await;
    let mut parks = Vec::new();
    let mut subs = Vec::new();
    for user in [7, 8] {
        let park = park();
        let sub = hub.subscribe(&[1], user, Some(Lag::new(8, None)));
        sub.allow_parking(&park);
        parks.push(park);
        subs.push(sub);
    }
    catch_up(&hub, snap(10, 10, &[]), vec![]).await; // room 1 goes live
    for (sub, park) in subs.iter().zip(&parks) {
        let _ = woken(sub);
        park.checking();
        assert!(park.park(&snap(10, 10, &[])));
    }
    hub.message_notified(1);
    let plan = hub.next_catchup().await;
    let d = hub.finish_catchup(
        plan,
        Caught {
            head: snap(11, 11, &[]),
            rows: vec![msg(1, 1, 10)],
            revoked: vec![(1, 7)],
            complete: true,
        },
    );
    assert!(woken(&subs[0]), "user 7 is woken to check its access");
    assert!(!woken(&subs[1]), "user 8's stream is left to the delivery");
    // Both are handed over with the rows; only user 8's park may be
    // written to (user 7's is stale until it has checked).
    assert_eq!(d[0].parked.len(), 2);
    let (p7, p8) = (&parks[0], &parks[1]);
    assert!(p7.unpark().is_some() && !p7.park(&snap(10, 10, &[])));
    assert!(p8.unpark().is_some() && p8.park(&snap(10, 10, &[])));
}

async fn started_hub(head: Arc<Snapshot>) -> Hub {
    let hub = Hub::new(4, 100, Metrics::new());
    catch_up(&hub, head, vec![]).await;
    hub
}

#[tokio::test]
async fn a_new_room_is_unknown_until_a_catchup_reads_it() {
    let hub = started_hub(snap(100, 100, &[])).await;
    let sub = hub.subscribe(&[1], 1, None);
    // Rows may have committed since head while nobody listened for them.
    assert!(matches!(
        hub.read(&[1], &snap(100, 100, &[]), None, 10),
        HubRead::Unknown
    ));
    // Registering scheduled a catch-up; it finds such a row and wakes us.
    catch_up(&hub, snap(101, 101, &[]), vec![msg(5, 1, 100)]).await;
    sub.notified().await;
    assert_eq!(
        ids(&hub.read(&[1], &snap(100, 100, &[]), None, 10)),
        vec![5]
    );
    assert!(matches!(
        hub.read(&[1], &snap(101, 101, &[]), None, 10),
        HubRead::Nothing { .. }
    ));
}

#[tokio::test]
async fn out_of_order_commits_are_delivered_once() {
    let hub = started_hub(snap(100, 100, &[])).await;
    let sub = hub.subscribe(&[1], 1, None);
    catch_up(&hub, snap(100, 100, &[]), vec![]).await;
    let s0 = snap(100, 100, &[]);
    assert!(matches!(
        hub.read(&[1], &s0, None, 10),
        HubRead::Nothing { .. }
    ));

    // Tx 100 (id 10) is open while tx 101 (id 11) commits.
    hub.message_notified(1);
    let s1 = snap(100, 102, &[100]);
    catch_up(&hub, s1.clone(), vec![msg(11, 1, 101)]).await;
    sub.notified().await;
    assert_eq!(ids(&hub.read(&[1], &s0, None, 10)), vec![11]);
    // A client now at s1 has nothing due until 100 commits.
    assert!(matches!(
        hub.read(&[1], &s1, None, 10),
        HubRead::Nothing { .. }
    ));

    hub.message_notified(1);
    let s2 = snap(102, 102, &[]);
    catch_up(&hub, s2.clone(), vec![msg(10, 1, 100)]).await;
    assert_eq!(ids(&hub.read(&[1], &s1, None, 10)), vec![10]);
    assert_eq!(ids(&hub.read(&[1], &s0, None, 10)), vec![10, 11]);
    assert!(matches!(
        hub.read(&[1], &s2, None, 10),
        HubRead::Nothing { .. }
    ));
}

#[tokio::test]
async fn unknown_when_cursor_precedes_coverage_or_is_newer_than_known() {
    let hub = started_hub(snap(50, 50, &[])).await;
    let _sub = hub.subscribe(&[1], 1, None);
    catch_up(&hub, snap(50, 50, &[]), vec![]).await;
    // Older than the room's coverage.
    assert!(matches!(
        hub.read(&[1], &snap(40, 45, &[]), None, 10),
        HubRead::Unknown
    ));
    // Beyond anything read from the database: may be from the future.
    assert!(matches!(
        hub.read(&[1], &snap(60, 60, &[]), None, 10),
        HubRead::Unknown
    ));
    hub.observe(&snap(60, 60, &[]));
    assert!(matches!(
        hub.read(&[1], &snap(60, 60, &[]), None, 10),
        HubRead::Nothing { .. }
    ));
    // A room nobody subscribed to.
    assert!(matches!(
        hub.read(&[2], &snap(50, 50, &[]), None, 10),
        HubRead::Unknown
    ));
}

#[tokio::test]
async fn room_registered_during_catchup_waits_for_the_next() {
    let hub = started_hub(snap(10, 10, &[])).await;
    let _a = hub.subscribe(&[1], 1, None);
    let plan = hub.next_catchup().await;
    // Not in this plan: room 2 had a row in this window, which the
    // plan did not read.
    let _b = hub.subscribe(&[2], 1, None);
    let _ = hub.finish_catchup(
        plan,
        caught(snap(12, 12, &[]), vec![msg(1, 1, 10), msg(2, 2, 11)]),
    );
    assert!(matches!(
        hub.read(&[2], &snap(12, 12, &[]), None, 10),
        HubRead::Unknown
    ));
    assert_eq!(ids(&hub.read(&[1], &snap(10, 10, &[]), None, 10)), vec![1]);
    catch_up(&hub, snap(13, 13, &[]), vec![]).await;
    assert!(matches!(
        hub.read(&[2], &snap(12, 12, &[]), None, 10),
        HubRead::Nothing { .. }
    ));
    // Its coverage starts at that catch-up's lower snapshot.
    assert!(matches!(
        hub.read(&[2], &snap(10, 10, &[]), None, 10),
        HubRead::Unknown
    ));
}

#[tokio::test]
async fn trimming_moves_the_bound_and_limit_pages() {
    let hub = started_hub(snap(1, 1, &[])).await;
    let _s = hub.subscribe(&[1], 1, None);
    catch_up(&hub, snap(1, 1, &[]), vec![]).await;
    for i in 0..6u64 {
        hub.message_notified(1);
        catch_up(&hub, snap(i + 2, i + 2, &[]), vec![msg(i as i64, 1, i + 1)]).await;
    }
    // Capacity 4: rows 0 and 1 dropped, bound moved to snapshot 3:3.
    assert!(matches!(
        hub.read(&[1], &snap(1, 1, &[]), None, 10),
        HubRead::Unknown
    ));
    assert_eq!(
        ids(&hub.read(&[1], &snap(3, 3, &[]), None, 10)),
        vec![2, 3, 4, 5]
    );
    match hub.read(&[1], &snap(3, 3, &[]), None, 3) {
        HubRead::Due { rows, more, .. } => {
            assert_eq!(rows.len(), 3);
            assert!(more);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_unwatched_room_lingers_then_is_forgotten() {
    let hub = started_hub(snap(1, 1, &[])).await;
    let a = hub.subscribe(&[1, 2], 1, None);
    let b = hub.subscribe(&[2], 1, Some(Lag::new(8, None)));
    catch_up(&hub, snap(1, 1, &[]), vec![]).await;
    drop(a);
    drop(b);
    // Still live for a client that comes straight back.
    let _c = hub.subscribe(&[2], 1, None);
    assert!(matches!(
        hub.read(&[2], &snap(1, 1, &[]), None, 10),
        HubRead::Nothing { .. }
    ));
    assert_eq!(hub.room_count(), 2);
    tokio::time::advance(LINGER + Duration::from_secs(1)).await;
    hub.message_notified(2);
    catch_up(&hub, snap(2, 2, &[]), vec![]).await;
    assert_eq!(
        hub.room_count(),
        1,
        "room 1 forgotten, room 2 still watched"
    );
}

fn version(id: i64, room: i64, txid: u64, content: &str) -> Arc<StoredMessage> {
    let m = Message {
        id,
        room,
        sender: User {
            id: 1,
            username: "a".into(),
            first_name: String::new(),
            last_name: String::new(),
        },
        content: content.into(),
        created_at: Utc::now(),
        edited: content != "v1",
    };
    Arc::new(StoredMessage::new(&m, txid))
}

fn contents(r: &HubRead) -> Vec<String> {
    match r {
        HubRead::Due { rows, .. } => rows
            .iter()
            .map(|m| String::from_utf8_lossy(&m.json).into_owned())
            .collect(),
        HubRead::Nothing { .. } => vec![],
        HubRead::Unknown => panic!("unknown"),
    }
}

#[tokio::test]
async fn an_edit_or_a_delete_supersedes_what_the_ring_holds_of_the_message() {
    let hub = started_hub(snap(10, 10, &[])).await;
    let _sub = hub.subscribe(&[1], 1, None);
    catch_up(&hub, snap(10, 10, &[]), vec![]).await;
    let before = snap(10, 10, &[]);
    catch_up(&hub, snap(11, 11, &[]), vec![version(5, 1, 10, "v1")]).await;
    let after_v1 = snap(11, 11, &[]);
    catch_up(&hub, snap(12, 12, &[]), vec![version(5, 1, 11, "v2")]).await;
    // Due once, as it is now, whether the reader saw v1 or not.
    for at in [&before, &after_v1] {
        let got = contents(&hub.read(&[1], at, None, 10));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("\"content\":\"v2\""), "{got:?}");
        assert!(got[0].contains("\"edited\":true"), "{got:?}");
    }
    catch_up(
        &hub,
        snap(13, 13, &[]),
        vec![Arc::new(StoredMessage::deletion(
            5,
            -1,
            1,
            12,
            chrono::Utc::now(),
        ))],
    )
    .await;
    match hub.read(&[1], &before, None, 10) {
        HubRead::Due { rows, .. } => {
            assert_eq!(rows.len(), 1);
            assert!(rows[0].deleted && rows[0].id == 5);
        }
        other => panic!("{other:?}"),
    }
}

fn is_current(r: HubRead) -> bool {
    match r {
        HubRead::Nothing { current, .. } => current,
        HubRead::Due { .. } => panic!("rows due"),
        HubRead::Unknown => panic!("unknown"),
    }
}

const ORIGIN: Origin = Origin {
    system_id: 7,
    timeline: 1,
};

/// "Nothing is due" answers a `timeout=0` poll only while no NOTIFY of
/// the room waits for a catch-up and none can have been lost: after a
/// reconnection, not until a catch-up planned on the new connection has
/// finished.
#[tokio::test]
async fn memory_is_current_only_when_no_notification_is_pending_or_lost() {
    let hub = Hub::new(4, 100, Metrics::new());
    hub.connected(ORIGIN);
    let _sub = hub.subscribe(&[1], 1, None);
    catch_up(&hub, snap(10, 10, &[]), vec![]).await;
    catch_up(&hub, snap(11, 11, &[]), vec![]).await;
    let at = snap(11, 11, &[]);
    assert!(is_current(hub.read(&[1], &at, None, 10)));

    hub.message_notified(1);
    assert!(!is_current(hub.read(&[1], &at, None, 10)), "a NOTIFY waits");
    catch_up(&hub, snap(12, 12, &[]), vec![]).await;
    let at = snap(12, 12, &[]);
    assert!(is_current(hub.read(&[1], &at, None, 10)));

    hub.disconnected();
    assert!(!is_current(hub.read(&[1], &at, None, 10)), "listener down");
    // A catch-up planned before the reconnection cannot have read what
    // the lost notifications were for.
    hub.message_notified(1);
    let plan = hub.next_catchup().await;
    hub.connected(ORIGIN);
    let _ = hub.finish_catchup(plan, caught(snap(13, 13, &[]), vec![]));
    let at = snap(13, 13, &[]);
    assert!(!is_current(hub.read(&[1], &at, None, 10)));
    catch_up(&hub, snap(14, 14, &[]), vec![]).await;
    let at = snap(14, 14, &[]);
    assert!(is_current(hub.read(&[1], &at, None, 10)));
}

/// A window read at a snapshot older than the head is brought to the head
/// at once by the ring; one read at a newer snapshot waits for the
/// catch-up that reaches it, and takes only the changes it did not see.
#[tokio::test]
async fn a_seed_is_brought_to_the_head_before_it_answers() {
    let hub = Hub::new(16, 100, Metrics::new());
    hub.connected(ORIGIN);
    let _sub = hub.subscribe(&[1], 1, None);
    catch_up(&hub, snap(20, 20, &[]), vec![]).await;
    catch_up(&hub, snap(22, 22, &[]), vec![msg(3, 1, 21)]).await;

    // Read at 21, which did not see tx 21 (message 3): the ring adds it.
    let older = Window::from_latest(&[msg(1, 1, 5), msg(2, 1, 6)], true).unwrap();
    hub.seed(1, snap(21, 21, &[]), older);
    let page = hub.latest(1, 10).expect("installed at once");
    assert_eq!(
        page.rows.iter().map(|m| m.id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(*page.head, *snap(22, 22, &[]));

    // Read at 24, which saw tx 22 (message 4) and 23 (an edit of 3): not
    // an answer until the head sees 24.
    let edited = {
        let m = Message {
            id: 3,
            room: 1,
            sender: User {
                id: 1,
                username: "a".into(),
                first_name: String::new(),
                last_name: String::new(),
            },
            content: "edited".into(),
            created_at: Utc::now(),
            edited: true,
        };
        Arc::new(StoredMessage::new(&m, 23))
    };
    let newer = Window::from_latest(
        &[msg(1, 1, 5), msg(2, 1, 6), edited.clone(), msg(4, 1, 22)],
        true,
    )
    .unwrap();
    let hub2 = Hub::new(16, 100, Metrics::new());
    hub2.connected(ORIGIN);
    let _sub2 = hub2.subscribe(&[1], 1, None);
    catch_up(&hub2, snap(20, 20, &[]), vec![]).await;
    catch_up(&hub2, snap(22, 22, &[]), vec![msg(3, 1, 21)]).await;
    hub2.seed(1, snap(24, 24, &[]), newer);
    assert!(
        hub2.latest(1, 10).is_none(),
        "the seed is ahead of the head"
    );
    // The catch-up reads 22..: what the seed saw (4, the edit of 3) is not
    // applied again over it; what it did not (5, tx 24) is.
    catch_up(
        &hub2,
        snap(25, 25, &[]),
        vec![msg(4, 1, 22), edited.clone(), msg(5, 1, 24)],
    )
    .await;
    let page = hub2.latest(1, 10).expect("installed once the head saw 24");
    assert_eq!(
        page.rows.iter().map(|m| m.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(page.rows[2].json, edited.json, "the edit, once");
}
