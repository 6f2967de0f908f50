// @ts-check
/**
 * hark.js: the browser client of hark, one dependency-free ES module.
 *
 *     import { createClient } from "https://chat.example.com/hark.js";
 *     const hark = createClient({ token, getToken: () => fetchFreshToken() });
 *     const sub = hark.subscribe({ rooms: [room], cursor, onMessage, onReset });
 *
 * - `subscribe` holds an EventSource on `/events` and falls back to the
 *   long poll (`/api/chat/messages/poll/`) when a stream cannot be held:
 *   no `ready` comes (a proxy buffers it), or it is refused or cut again
 *   and again while the rest of the API answers.
 * - It keeps the cursor (each event's id, each poll's `cursor`) and
 *   resumes from it, so every message is delivered exactly once: across
 *   reconnects, restarts of hark, token renewals and the switch to polls.
 *   The cursor makes it exact; nothing is de-duplicated.
 * - On `reset` (the position cannot be continued) it calls `onReset`:
 *   the application reloads its history; delivery goes on live.
 * - On `token_expired` it asks the application for a fresh token
 *   (`getToken`) and goes on from the same cursor.
 * - `typing(room)` sends typing with a debounce, and stops on send, on
 *   blur and when the page goes away. Typing, presence and read receipts
 *   arrive as callbacks; during long polls they come from the rooms API.
 *
 * Served by hark at `/hark.js`; it talks to the hark it was loaded from
 * unless `baseUrl` says otherwise (another origin needs
 * `HARK_CORS_ORIGINS`). The HTTP contract is hark's docs/API.md.
 *
 * @module hark
 */

/**
 * @typedef {object} User
 * @property {number} id
 * @property {string} username
 * @property {string} first_name
 * @property {string} last_name
 */

/**
 * @typedef {object} Message
 * @property {number} id
 * @property {number} room the room's id
 * @property {User} sender
 * @property {string} content
 * @property {string} created_at RFC 3339, UTC, microseconds
 * @property {boolean} [edited] true once its content changed after its insert
 */

/**
 * @typedef {object} Deleted A message that left a room (deleted, or moved away).
 * @property {number} id
 * @property {number} room
 */

/**
 * @typedef {object} ReadMarker
 * @property {number} user the reader's id
 * @property {string} read_at
 */

/**
 * @typedef {object} Room
 * @property {number} id
 * @property {string} type
 * @property {string} name
 * @property {User[]} participants
 * @property {Message|null} last_message
 * @property {number} unread_count
 * @property {string} updated_at
 * @property {string} created_at
 * @property {User|null} typing_user
 * @property {User[]} typing_users
 * @property {User[]} [online_users]
 * @property {ReadMarker[]} [read_markers]
 */

/**
 * @typedef {object} PollAnswer
 * @property {Message[]} messages oldest first
 * @property {Deleted[]} deleted
 * @property {string} cursor where to go on from (`since`, or a subscription's `cursor`)
 * @property {string} timestamp
 * @property {boolean} has_more
 */

/**
 * @typedef {object} TypingEvent
 * @property {number} room
 * @property {User} user
 * @property {boolean} is_typing
 */

/**
 * @typedef {object} PresenceEvent
 * @property {number} room
 * @property {User} user
 * @property {boolean} online
 */

/**
 * @typedef {object} ReadEvent
 * @property {number} room
 * @property {User} user
 * @property {string} read_at
 */

/** @typedef {"stream" | "poll"} Transport */

/**
 * "connecting" until the first `ready` (or poll answer), "live" while
 * delivering, "reconnecting" while it finds its way back (nothing is lost
 * meanwhile), "closed" after `close()` or a fatal error.
 * @typedef {"connecting" | "live" | "reconnecting" | "closed"} ConnectionState
 */

/**
 * @typedef {object} TokenRequest Why a fresh token is asked for.
 * @property {number} status 401
 * @property {string} code `token_expired`
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [baseUrl] hark's URL; default: where this module was loaded from
 * @property {string} [token] the access token (a simplejwt access token)
 * @property {(why: TokenRequest) => (string | Promise<string>)} [getToken]
 *   called when hark answers `token_expired`: resolve to a fresh token (one
 *   call at a time, shared by every request waiting for it); a rejection
 *   or an empty string gives up with the 401
 * @property {typeof fetch} [fetch] default: the global `fetch` at the time of each call
 */

/**
 * @typedef {object} RequestOptions
 * @property {unknown} [body] sent as JSON
 * @property {Record<string, string | number | (string | number)[] | null | undefined>} [query]
 * @property {boolean} [keepalive] let it outlive the page (`pagehide`)
 * @property {AbortSignal} [signal]
 * @property {boolean} [renew] false: no `getToken` on `token_expired`, the 401 is thrown
 */

/**
 * @typedef {object} SubscribeOptions
 * @property {number | number[]} [rooms] the rooms; omitted: every room of the user
 * @property {string | null} [cursor] deliver what commits after this cursor
 *   (from `history()`, a poll, or `sub.cursor`); omitted: from now on
 * @property {"auto" | "stream" | "poll"} [transport] "auto" (default):
 *   a stream, long polls when it cannot be held; "stream": never fall
 *   back; "poll": long polls only
 * @property {number} [readyTimeoutMs] a stream attempt without `ready`
 *   (nor an error) for this long, while the API answers, is held up on
 *   its way: fall back (default 10000)
 * @property {number} [maxStreamFailures] streams refused or cut this many
 *   times within `failureWindowMs`, while the API answers: fall back (default 3)
 * @property {number} [failureWindowMs] default 60000
 * @property {number} [pollTimeoutS] the long poll's `timeout` (default 25)
 * @property {number} [signalsEveryMs] while polling, how often typing,
 *   presence and receipts are read from the rooms API (default 3000; 0: never)
 * @property {(message: Message, info: {transport: Transport}) => void} [onMessage]
 *   a new message, or a newer version of one already delivered (an edit:
 *   replace by `id`)
 * @property {(deleted: Deleted, info: {transport: Transport}) => void} [onDelete]
 * @property {(info: {cursor: string, room?: number}) => void} [onReset]
 *   the position could not be continued (another database, or older than
 *   hark remembers deletes for): reload history; delivery goes on from `cursor`
 * @property {(info: {cursor: string | null, transport: Transport, resumed: boolean}) => void} [onReady]
 *   connected; the typing and presence events that follow at once are the
 *   current state (who is typing, who is online)
 * @property {(event: TypingEvent) => void} [onTyping] never about oneself
 * @property {(event: PresenceEvent) => void} [onPresence] never about oneself
 * @property {(event: ReadEvent) => void} [onRead] another participant read the room
 * @property {(state: ConnectionState, info: {transport: Transport, error?: HarkError}) => void} [onState]
 *   the state or the transport changed
 * @property {(error: HarkError) => void} [onError]
 *   a fatal error (not a participant, no such room, a token refused and
 *   not renewed): the subscription is closed
 */

/** @typedef {Required<Pick<SubscribeOptions, "readyTimeoutMs" | "maxStreamFailures" | "failureWindowMs" | "pollTimeoutS" | "signalsEveryMs">>} Timings */

/** @type {Timings} */
const DEFAULTS = {
  readyTimeoutMs: 10000,
  maxStreamFailures: 3,
  failureWindowMs: 60000,
  pollTimeoutS: 25,
  signalsEveryMs: 3000,
};
/** Backoff between our own reconnects and failed polls. */
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 30000;

/** An error answer of hark (or no answer: status 0, code "network"). */
export class HarkError extends Error {
  /**
   * @param {number} status the HTTP status; 0 when hark could not be reached
   * @param {string} code hark's code (`token_expired`, `not_a_participant`, `rate_limited`, …)
   * @param {string} message a sentence for a person
   * @param {number | null} [retryAfter] seconds, from `Retry-After`
   */
  constructor(status, code, message, retryAfter) {
    super(message);
    this.name = "HarkError";
    /** @type {number} */
    this.status = status;
    /** @type {string} */
    this.code = code;
    /** @type {number | null} */
    this.retryAfter = retryAfter == null ? null : retryAfter;
  }
}

/**
 * The claims of a JWT, unverified (for `user_id` and `exp`), or null.
 * @param {string} token
 * @returns {Record<string, unknown> | null}
 */
export function tokenClaims(token) {
  try {
    let part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    while (part.length % 4) part += "=";
    const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch (e) {
    return null;
  }
}

/**
 * Whether hark would refuse `token` as expired now, by its `exp` (false
 * when it has none or is not a JWT: then hark's answer tells).
 * @param {string} token
 */
function expiredNow(token) {
  const exp = Number((tokenClaims(token) || {}).exp);
  // hark accepts a token through the second `exp`.
  return Number.isFinite(exp) && Date.now() >= (exp + 1) * 1000;
}

/** @param {unknown} e */
function isAbort(e) {
  return !!e && typeof e === "object" && /** @type {{name?: string}} */ (e).name === "AbortError";
}

/**
 * Errors that retrying will not mend.
 * @param {HarkError} e
 */
function isFatal(e) {
  return e.status === 400 || e.status === 401 || e.status === 403 || e.status === 404;
}

/** @param {number} ms */
function jitter(ms) {
  return Math.round(ms * (0.75 + Math.random() * 0.5));
}

/** @param {number} ms @param {AbortSignal} [signal] */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(t); resolve(undefined); }, { once: true });
  });
}

/** @param {string} text */
function parse(text) {
  try {
    return JSON.parse(text);
  } catch (e) {
    return null;
  }
}

/**
 * Reports an error thrown by an application callback the way an uncaught
 * error is, without stopping delivery.
 * @param {unknown} e
 */
function report(e) {
  setTimeout(() => { throw e; });
}

/** @returns {string} */
function defaultBaseUrl() {
  try {
    return new URL("./", import.meta.url).href;
  } catch (e) {
    return location.origin + "/";
  }
}

/** A client of one hark, for one user (one token at a time). */
export class HarkClient {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    /** hark's URL, ending in `/`. @type {string} */
    this.baseUrl = String(options.baseUrl || defaultBaseUrl()).replace(/\/*$/, "/");
    /** @private */
    this._token = options.token ? String(options.token).trim() : "";
    /** @private */
    this._getToken = options.getToken || null;
    /** @private */
    this._fetch = options.fetch || null;
    /** @private @type {Promise<string> | null} */
    this._renewing = null;
    /** @private @type {Set<Subscription>} */
    this._subs = new Set();
  }

  /** The current access token. */
  get token() {
    return this._token;
  }

  /**
   * Replaces the token (a sign-in, or a token the application renewed on
   * its own); subscriptions use it from their next request.
   * @param {string} token
   */
  setToken(token) {
    this._token = String(token || "").trim();
  }

  /** The user id the token names (`user_id`), or null. */
  get userId() {
    const id = parseInt(String((tokenClaims(this._token) || {}).user_id), 10);
    return Number.isFinite(id) ? id : null;
  }

  /**
   * An absolute URL of hark.
   * @param {string} path relative to `baseUrl` (a leading `/` is ignored)
   * @param {RequestOptions["query"]} [query] arrays repeat the key; null and undefined are left out
   */
  url(path, query) {
    const u = new URL(path.replace(/^\/+/, ""), this.baseUrl);
    for (const [k, v] of Object.entries(query || {})) {
      for (const one of Array.isArray(v) ? v : [v]) {
        if (one !== null && one !== undefined) u.searchParams.append(k, String(one));
      }
    }
    return u.href;
  }

  /**
   * A JSON request with the token. On `token_expired` it asks `getToken`
   * once and sends again.
   * @param {string} method
   * @param {string} path
   * @param {RequestOptions} [opts]
   * @returns {Promise<any>} the parsed body
   * @throws {HarkError} for an error answer or none
   */
  async request(method, path, opts = {}) {
    const token = this._token;
    /** @type {Record<string, string>} */
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    /** @type {RequestInit} */
    const init = { method, headers, cache: "no-store" };
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    if (opts.keepalive) init.keepalive = true;
    if (opts.signal) init.signal = opts.signal;
    const doFetch = this._fetch || globalThis.fetch;
    let resp;
    let text;
    try {
      resp = await doFetch.call(globalThis, this.url(path, opts.query), init);
      text = await resp.text();
    } catch (e) {
      if (isAbort(e)) throw e;
      throw new HarkError(0, "network", "Cannot reach the server.");
    }
    const data = text ? parse(text) : null;
    if (resp.ok) return data;
    const retry = parseInt(resp.headers.get("Retry-After") || "", 10);
    const err = new HarkError(
      resp.status,
      (data && data.code) || "http_" + resp.status,
      (data && data.error) || "The server answered " + resp.status + ".",
      retry > 0 ? retry : null,
    );
    if (err.code === "token_expired" && opts.renew !== false && this._getToken) {
      await this.renewToken(token, err);
      return this.request(method, path, { ...opts, renew: false });
    }
    throw err;
  }

  /**
   * A fresh token from `getToken`, in place of `stale`. Concurrent callers
   * share one call; a caller whose token was renewed meanwhile gets the
   * current one at once.
   * @param {string} stale the token hark refused
   * @param {HarkError} why
   * @returns {Promise<string>}
   */
  renewToken(stale, why) {
    if (this._token && this._token !== stale) return Promise.resolve(this._token);
    const getToken = this._getToken;
    if (!getToken) return Promise.reject(why);
    if (!this._renewing) {
      this._renewing = Promise.resolve()
        .then(() => getToken({ status: why.status, code: why.code }))
        .then((fresh) => {
          if (!fresh) throw why;
          this._token = String(fresh).trim();
          return this._token;
        })
        .finally(() => {
          this._renewing = null;
        });
    }
    return this._renewing;
  }

  /** The user's rooms, newest activity first. @returns {Promise<Room[]>} */
  rooms() {
    return this.request("GET", "api/chat/rooms/");
  }

  /** @param {number} room @returns {Promise<Room>} */
  room(room) {
    return this.request("GET", "api/chat/rooms/" + encodeURIComponent(room) + "/");
  }

  /**
   * The latest messages of a room (oldest first) and the cursor they end
   * at: pass it to `subscribe` to miss nothing after them.
   * @param {number} room
   * @param {{limit?: number}} [opts] default 50
   * @returns {Promise<PollAnswer>}
   */
  history(room, opts = {}) {
    return this.poll(room, { limit: opts.limit || 50 });
  }

  /**
   * One poll, as `GET /api/chat/messages/poll/` answers it.
   * @param {number} room
   * @param {{since?: string | null, timeout?: number, limit?: number, signal?: AbortSignal}} [opts]
   * @returns {Promise<PollAnswer>}
   */
  poll(room, opts = {}) {
    const query = { room_id: room, since: opts.since || null, timeout: opts.timeout, limit: opts.limit };
    return this.request("GET", "api/chat/messages/poll/", { query, signal: opts.signal });
  }

  /**
   * Sends a message (it clears one's typing in that room).
   * @param {number} room
   * @param {string} content
   * @returns {Promise<Message>}
   */
  send(room, content) {
    return this.request("POST", "api/chat/messages/", { body: { room_id: room, content } });
  }

  /** Moves one's read marker in `room` to now. @param {number} room */
  markRead(room) {
    return this.request("POST", "api/chat/rooms/" + encodeURIComponent(room) + "/read/", { body: {} });
  }

  /**
   * One typing POST; `typing(room)` debounces them.
   * @param {number} room
   * @param {boolean} isTyping
   * @param {{keepalive?: boolean}} [opts]
   */
  setTyping(room, isTyping, opts = {}) {
    return this.request("POST", "api/chat/rooms/" + encodeURIComponent(room) + "/typing/", {
      body: { is_typing: !!isTyping },
      keepalive: !!opts.keepalive,
    });
  }

  /**
   * Typing in `room`, debounced: see {@link Typing}.
   * @param {number} room
   * @param {{resendMs?: number, idleMs?: number}} [opts]
   */
  typing(room, opts) {
    return new Typing(this, room, opts);
  }

  /**
   * Starts delivering a room's (or every room's) events.
   * @param {SubscribeOptions} [opts]
   */
  subscribe(opts = {}) {
    const sub = new Subscription(this, opts);
    this._subs.add(sub);
    return sub;
  }

  /** Closes every subscription of this client. */
  close() {
    for (const sub of Array.from(this._subs)) sub.close();
  }
}

/**
 * Whether one is typing in a room, as hark is told: `true` on the first
 * key and again at most every `resendMs` while keys come (hark forgets it
 * 5 s after the last), `false` after `idleMs` without a key, on `stop()`
 * (call it on send and on blur; `attach` does the blur and the page's
 * going away) and when the box is emptied. The POSTs go one at a time,
 * in order: a late `true` never lands after its `false`.
 */
export class Typing {
  /**
   * @param {HarkClient} client
   * @param {number} room
   * @param {{resendMs?: number, idleMs?: number}} [opts]
   */
  constructor(client, room, opts = {}) {
    this.client = client;
    this.room = room;
    this.resendMs = opts.resendMs || 2000;
    this.idleMs = opts.idleMs || 3000;
    /** @private */
    this._on = false;
    /** @private */
    this._lastTrue = 0;
    /** @private @type {ReturnType<typeof setTimeout> | undefined} */
    this._idle = undefined;
    /** @private @type {Promise<unknown>} */
    this._chain = Promise.resolve();
  }

  /** Whether hark was last told "typing". */
  get active() {
    return this._on;
  }

  /**
   * A key in the message box.
   * @param {boolean} [hasText] false when the box is now empty: stops
   */
  input(hasText = true) {
    if (!hasText) {
      this.stop();
      return;
    }
    const now = Date.now();
    if (!this._on || now - this._lastTrue >= this.resendMs) {
      this._on = true;
      this._lastTrue = now;
      this._post(true, false);
    }
    clearTimeout(this._idle);
    this._idle = setTimeout(() => this.stop(), this.idleMs);
  }

  /**
   * Not typing any more (sent, blurred, left): tells hark if it was told
   * otherwise.
   * @param {{keepalive?: boolean}} [opts] keepalive: the page is going away
   */
  stop(opts = {}) {
    clearTimeout(this._idle);
    this._idle = undefined;
    if (!this._on) return;
    this._on = false;
    this._lastTrue = 0;
    this._post(false, !!opts.keepalive);
  }

  /**
   * Follows a text input or textarea: keys, blur, and the page going
   * away. Returns a function that detaches it (and stops).
   * @param {HTMLInputElement | HTMLTextAreaElement} el
   * @returns {() => void}
   */
  attach(el) {
    const onInput = () => this.input(el.value.trim() !== "");
    const onBlur = () => this.stop();
    const onHide = () => this.stop({ keepalive: true });
    el.addEventListener("input", onInput);
    el.addEventListener("blur", onBlur);
    window.addEventListener("pagehide", onHide);
    return () => {
      el.removeEventListener("input", onInput);
      el.removeEventListener("blur", onBlur);
      window.removeEventListener("pagehide", onHide);
      this.stop();
    };
  }

  /** @private @param {boolean} on @param {boolean} keepalive */
  _post(on, keepalive) {
    const send = () => this.client.setTyping(this.room, on, { keepalive });
    // Best effort: a refused or lost typing POST (a 429 too) shows nothing.
    if (keepalive) {
      send().catch(() => {});
      return;
    }
    this._chain = this._chain.then(send).catch(() => {});
  }
}

/**
 * One subscription: a stream, or long polls, delivering to its callbacks.
 * Its `cursor` is the position after everything delivered so far (for a
 * stream, or the polls of one room).
 */
export class Subscription {
  /**
   * @param {HarkClient} client
   * @param {SubscribeOptions} opts
   */
  constructor(client, opts) {
    this.client = client;
    /** @private @type {SubscribeOptions & Timings} */
    this._opts = { ...DEFAULTS, ...opts };
    for (const k of /** @type {(keyof Timings)[]} */ (Object.keys(DEFAULTS))) {
      if (typeof opts[k] !== "number") this._opts[k] = DEFAULTS[k];
    }
    const rooms = opts.rooms === undefined || opts.rooms === null ? null : [].concat(/** @type {any} */ (opts.rooms));
    /** The rooms, or null for every room of the user. @type {number[] | null} */
    this.rooms = rooms ? rooms.map(Number) : null;
    /** @type {string | null} */
    this.cursor = opts.cursor || null;
    /** @type {Transport} */
    this.transport = opts.transport === "poll" || typeof EventSource !== "function" ? "poll" : "stream";
    /** @type {ConnectionState} */
    this.state = "connecting";
    /** @private what `onState` last told */
    this._stateKey = "connecting/" + this.transport;
    this.closed = false;
    /** @private Bumps whenever what runs is replaced: old callbacks see it and stop. */
    this._gen = 0;
    /** @private @type {EventSource | null} */
    this._es = null;
    /** @private */
    this._live = false;
    /** @private @type {number[]} when streams failed while the API answered */
    this._failures = [];
    /** @private */
    this._retryMs = RETRY_MIN_MS;
    /** @private */
    this._lastRenew = 0;
    /** @private @type {ReturnType<typeof setTimeout> | undefined} */
    this._timer = undefined;
    /** @private @type {ReturnType<typeof setTimeout> | undefined} */
    this._watchdog = undefined;
    /** @private @type {ReturnType<typeof setInterval> | undefined} */
    this._signalsTimer = undefined;
    /** @private @type {AbortController} */
    this._abort = new AbortController();
    /** @private @type {Map<number, string | null>} the polls' cursors */
    this._roomCursors = new Map();
    /** @private @type {Map<number, {typing: Map<number, User>, online: Map<number, User>, reads: Map<number, string>}>} */
    this._known = new Map();
    /** @private */
    this._onOnline = () => {
      if (this._timer !== undefined && this.transport === "stream" && !this._es) {
        clearTimeout(this._timer);
        this._timer = undefined;
        this._retryMs = RETRY_MIN_MS;
        this._openStream();
      }
    };
    if (typeof window !== "undefined") window.addEventListener("online", this._onOnline);
    if (this.transport === "stream") this._openStream();
    else this._startPolling();
  }

  /** Stops delivering: `onState("closed")`, then nothing more. */
  close() {
    if (this.closed) return;
    this._stop();
    this._setState("closed");
  }

  // ---- internals ---------------------------------------------------------

  /** @private */
  _stop() {
    this.closed = true;
    this._gen++;
    this._closeStream();
    this._abort.abort();
    clearTimeout(this._timer);
    clearInterval(this._signalsTimer);
    if (typeof window !== "undefined") window.removeEventListener("online", this._onOnline);
    this.client["_subs"].delete(this);
  }

  /**
   * @private
   * @param {"onMessage" | "onDelete" | "onReset" | "onReady" | "onTyping" | "onPresence" | "onRead" | "onState" | "onError"} name
   * @param {...any} args
   */
  _emit(name, ...args) {
    const fn = this._opts[name];
    if (typeof fn !== "function") return;
    try {
      /** @type {Function} */ (fn).apply(this, args);
    } catch (e) {
      report(e);
    }
  }

  /** @private @param {ConnectionState} state @param {HarkError} [error] */
  _setState(state, error) {
    const key = state + "/" + this.transport;
    if (this._stateKey === key) return;
    this._stateKey = key;
    this.state = state;
    this._emit("onState", state, error ? { transport: this.transport, error } : { transport: this.transport });
  }

  /** @private @param {HarkError} err */
  _fail(err) {
    if (this.closed) return;
    this._stop();
    this._setState("closed", err);
    this._emit("onError", err);
  }

  /**
   * Whether hark answers, for this user and these rooms: null when it
   * does, else why not. Tells a stream that failed on its way (hark
   * answers) from hark being away, and finds `token_expired`.
   * @private
   * @returns {Promise<HarkError | null>}
   */
  _probe() {
    const one = this.rooms && this.rooms.length === 1;
    const path = one ? "api/chat/rooms/" + encodeURIComponent(String(this.rooms?.[0])) + "/" : "api/chat/rooms/";
    return this.client.request("GET", path, { renew: false, signal: this._abort.signal }).then(
      () => null,
      (e) => (isAbort(e) ? new HarkError(0, "aborted", "Closed.") : e),
    );
  }

  // ---- the stream ----------------------------------------------------------

  /** @private */
  _closeStream() {
    clearTimeout(this._watchdog);
    if (this._es) {
      this._es.close();
      this._es = null;
    }
    this._live = false;
  }

  /** @private */
  _openStream() {
    if (this.closed) return;
    this._closeStream();
    clearTimeout(this._timer);
    this._timer = undefined;
    const gen = ++this._gen;
    const token = this.client.token;
    const url = this.client.url("events", {
      room_id: this.rooms,
      access_token: token || null,
      // A new EventSource cannot send Last-Event-ID; its own reconnects
      // send the header, which hark reads first.
      last_event_id: this.cursor,
    });
    const es = new EventSource(url);
    this._es = es;
    let reset = false;
    const mine = () => gen === this._gen && !this.closed;
    /** @param {string} type @param {(e: MessageEvent) => void} fn */
    const on = (type, fn) => {
      es.addEventListener(type, (e) => {
        if (mine()) fn(/** @type {MessageEvent} */ (e));
      });
    };
    on("reset", (e) => {
      const d = parse(e.data);
      if (d && d.cursor) this.cursor = d.cursor;
      reset = true;
      this._emit("onReset", { cursor: this.cursor || "" });
    });
    on("ready", (e) => {
      const before = this.cursor;
      const d = parse(e.data);
      this.cursor = e.lastEventId || (d && d.cursor) || this.cursor;
      this._live = true;
      this._retryMs = RETRY_MIN_MS;
      clearTimeout(this._watchdog);
      this._setState("live");
      this._emit("onReady", { cursor: this.cursor, transport: "stream", resumed: !!before && !reset });
      reset = false;
    });
    on("message", (e) => {
      const m = parse(e.data);
      if (e.lastEventId) this.cursor = e.lastEventId;
      if (m) this._emit("onMessage", m, { transport: "stream" });
    });
    on("delete", (e) => {
      const d = parse(e.data);
      if (e.lastEventId) this.cursor = e.lastEventId;
      if (d) this._emit("onDelete", d, { transport: "stream" });
    });
    on("typing", (e) => {
      const d = parse(e.data);
      if (d) this._emit("onTyping", d);
    });
    on("presence", (e) => {
      const d = parse(e.data);
      if (d) this._emit("onPresence", d);
    });
    on("read", (e) => {
      const d = parse(e.data);
      if (d) this._emit("onRead", d);
    });
    es.onerror = () => {
      if (!mine()) return;
      reset = false;
      this._streamError(es, gen, token);
    };
    this._armWatchdog(gen);
  }

  /**
   * The stream ended or could not open. The browser reconnects by itself
   * (sending Last-Event-ID) unless hark answered with an error status
   * (CLOSED); either way, find out why.
   * @private
   * @param {EventSource} es
   * @param {number} gen
   * @param {string} token the stream's token
   */
  _streamError(es, gen, token) {
    this._live = false;
    const closed = es.readyState === EventSource.CLOSED;
    if (closed) {
      es.close();
      if (this._es === es) this._es = null;
    }
    this._setState("reconnecting");
    this._armWatchdog(gen);
    if (token !== this.client.token || expiredNow(token)) {
      // Renewed meanwhile, or expired (the stream ends then): a new
      // stream with a token that works, from the same cursor.
      this._renew(gen, token, new HarkError(401, "token_expired", "Token is expired"));
      return;
    }
    this._probe().then((why) => {
      if (gen !== this._gen || this.closed) return;
      const ended = !this._es || this._es.readyState === EventSource.CLOSED;
      if (!why) {
        // hark answers: the stream was refused or cut on its way.
        if (this._tooManyFailures()) {
          this._fallback();
          return;
        }
        if (ended) this._reopenLater(gen, null);
      } else if (why.code === "token_expired") {
        this._renew(gen, token, why);
      } else if (isFatal(why)) {
        this._fail(why);
      } else if (ended) {
        // hark is away or busy: try again, later and later.
        this._reopenLater(gen, why.retryAfter);
      }
    });
  }

  /** @private @returns {boolean} */
  _tooManyFailures() {
    const now = Date.now();
    this._failures = this._failures.filter((t) => now - t < this._opts.failureWindowMs);
    this._failures.push(now);
    return this._opts.transport !== "stream" && this._failures.length >= this._opts.maxStreamFailures;
  }

  /**
   * A stream attempt that brings no `ready` and no error: held up on its
   * way (a buffering proxy), unless hark is away.
   * @private
   * @param {number} gen
   */
  _armWatchdog(gen) {
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => {
      // Only an attempt under way is judged, not a wait before the next.
      if (gen !== this._gen || this.closed || this._live || !this._es) return;
      this._probe().then((why) => {
        if (gen !== this._gen || this.closed || this._live || !this._es) return;
        if (!why && this._opts.transport !== "stream") this._fallback();
        else if (why && why.code === "token_expired") this._renew(gen, this.client.token, why);
        else if (why && isFatal(why)) this._fail(why);
        else this._armWatchdog(gen);
      });
    }, this._opts.readyTimeoutMs);
  }

  /**
   * @private
   * @param {number} gen
   * @param {string} stale
   * @param {HarkError} why
   */
  _renew(gen, stale, why) {
    this._closeStream();
    this._setState("reconnecting");
    this.client.renewToken(stale, why).then(
      (fresh) => {
        if (gen !== this._gen || this.closed) return;
        if (expiredNow(fresh)) {
          this._fail(why);
          return;
        }
        // Renewing again at once (a token hark refuses all the same):
        // not in a tight loop.
        const again = Date.now() - this._lastRenew < 1000;
        this._lastRenew = Date.now();
        if (again) this._reopenLater(gen, null);
        else this._openStream();
      },
      () => {
        if (gen === this._gen) this._fail(why);
      },
    );
  }

  /** @private @param {number} gen @param {number | null} retryAfterS */
  _reopenLater(gen, retryAfterS) {
    clearTimeout(this._timer);
    const delay = retryAfterS ? retryAfterS * 1000 : jitter(this._retryMs);
    this._retryMs = Math.min(this._retryMs * 2, RETRY_MAX_MS);
    this._timer = setTimeout(() => {
      this._timer = undefined;
      if (gen === this._gen && !this.closed) this._openStream();
    }, delay);
  }

  /** @private */
  _fallback() {
    this._closeStream();
    clearTimeout(this._timer);
    this.transport = "poll";
    this._setState("reconnecting");
    this._startPolling();
  }

  // ---- long polls ------------------------------------------------------------

  /** @private */
  async _startPolling() {
    const gen = ++this._gen;
    const alive = () => gen === this._gen && !this.closed;
    /** @type {Room[] | null} */
    let list = null;
    for (let delay = RETRY_MIN_MS; alive(); delay = Math.min(delay * 2, RETRY_MAX_MS)) {
      try {
        list = await this._fetchRooms();
        break;
      } catch (e) {
        if (!alive() || isAbort(e)) return;
        const err = /** @type {HarkError} */ (e);
        if (isFatal(err)) {
          this._fail(err);
          return;
        }
        // The room ids are needed to poll: wait for them. Else go on.
        if (this.rooms) break;
        this._setState("reconnecting", err);
        await sleep(jitter(delay), this._abort.signal);
      }
    }
    if (!alive()) return;
    const rooms = this.rooms || (list || []).map((r) => r.id);
    this._emit("onReady", { cursor: this.cursor, transport: "poll", resumed: !!this.cursor });
    // As after a stream's `ready`: who is typing, then who is online.
    if (list) this._signals(list, true);
    for (const room of rooms) this._startLoop(room, gen);
    if (this._opts.signalsEveryMs > 0) {
      this._signalsTimer = setInterval(() => {
        if (!alive()) return;
        this._fetchRooms().then(
          (fresh) => {
            if (!alive()) return;
            this._signals(fresh, false);
            // Following every room of the user: a room joined since.
            if (!this.rooms) for (const r of fresh) this._startLoop(r.id, gen);
          },
          () => { /* the polls tell what matters */ },
        );
      }, this._opts.signalsEveryMs);
    }
  }

  /** @private @returns {Promise<Room[]>} */
  async _fetchRooms() {
    if (this.rooms && this.rooms.length === 1) return [await this.client.room(this.rooms[0])];
    const all = await this.client.rooms();
    const rooms = this.rooms;
    return rooms ? all.filter((r) => rooms.includes(r.id)) : all;
  }

  /** @private @param {number} room @param {number} gen */
  _startLoop(room, gen) {
    if (this._roomCursors.has(room)) return;
    this._roomCursors.set(room, this.cursor);
    this._pollLoop(room, gen);
  }

  /**
   * Long polls of one room from its cursor: each answer's messages, then
   * its deletes, then the next poll from the answer's cursor.
   * @private
   * @param {number} room
   * @param {number} gen
   */
  async _pollLoop(room, gen) {
    const alive = () => gen === this._gen && !this.closed;
    let delay = RETRY_MIN_MS;
    // The first poll (and the first after a failure) answers at once: it
    // tells "live" without waiting for a message.
    let waits = false;
    while (alive()) {
      const since = this._roomCursors.get(room) || null;
      try {
        // Without a cursor: only where "now" is (history is the
        // application's, with `history()`).
        const ans = await this.client.poll(room, since
          ? { since, timeout: waits ? this._opts.pollTimeoutS : 0, signal: this._abort.signal }
          : { limit: 1, signal: this._abort.signal });
        if (!alive()) return;
        if (since) {
          for (const m of ans.messages || []) {
            if (!alive()) return;
            this._emit("onMessage", m, { transport: "poll" });
          }
          for (const d of ans.deleted || []) {
            if (!alive()) return;
            this._emit("onDelete", d, { transport: "poll" });
          }
        }
        this._roomCursors.set(room, ans.cursor);
        // One room polled: its cursor is the subscription's.
        if (this._roomCursors.size === 1) this.cursor = ans.cursor;
        delay = RETRY_MIN_MS;
        waits = true;
        this._setState("live");
      } catch (e) {
        if (!alive() || isAbort(e)) return;
        const err = /** @type {HarkError} */ (e);
        if (err.code === "cursor_reset") {
          // The position cannot be continued: from now on, and the
          // application reloads.
          this._roomCursors.set(room, null);
          try {
            const now = await this.client.poll(room, { limit: 1, signal: this._abort.signal });
            if (!alive()) return;
            this._roomCursors.set(room, now.cursor);
            if (this._roomCursors.size === 1) this.cursor = now.cursor;
            this._emit("onReset", { cursor: now.cursor, room });
            continue;
          } catch (e2) {
            if (!alive() || isAbort(e2)) return;
          }
        } else if (isFatal(err)) {
          // A room left while following all of them: only its polls end.
          if (!this.rooms && err.status === 403) return;
          this._fail(err);
          return;
        }
        waits = false;
        this._setState("reconnecting", err);
        await sleep(err.retryAfter ? err.retryAfter * 1000 : jitter(delay), this._abort.signal);
        delay = Math.min(delay * 2, RETRY_MAX_MS);
      }
    }
  }

  /**
   * Typing, presence and receipts from the rooms API, as the stream would
   * tell them: everything now (`snapshot`), else what changed.
   * @private
   * @param {Room[]} list
   * @param {boolean} snapshot
   */
  _signals(list, snapshot) {
    const me = this.client.userId;
    /** @param {User[] | undefined} users */
    const others = (users) => new Map((users || []).filter((u) => u && u.id !== me).map((u) => [u.id, u]));
    const typingOut = [];
    const presenceOut = [];
    const readOut = [];
    for (const r of list) {
      const prev = this._known.get(r.id);
      const typing = others(r.typing_users || (r.typing_user ? [r.typing_user] : []));
      const online = others(r.online_users);
      /** @type {Map<number, string>} */
      const reads = new Map();
      for (const m of r.read_markers || []) if (m && m.user !== me) reads.set(m.user, m.read_at);
      // Still typing is said again: it keeps a listener's stale timer off.
      for (const u of typing.values()) typingOut.push({ room: r.id, user: u, is_typing: true });
      if (prev && !snapshot) {
        for (const [id, u] of prev.typing) if (!typing.has(id)) typingOut.push({ room: r.id, user: u, is_typing: false });
        for (const [id, u] of online) if (!prev.online.has(id)) presenceOut.push({ room: r.id, user: u, online: true });
        for (const [id, u] of prev.online) if (!online.has(id)) presenceOut.push({ room: r.id, user: u, online: false });
        const people = others(r.participants);
        for (const [id, at] of reads) {
          const user = people.get(id);
          if (user && prev.reads.get(id) !== at) readOut.push({ room: r.id, user, read_at: at });
        }
      } else {
        for (const u of online.values()) presenceOut.push({ room: r.id, user: u, online: true });
      }
      this._known.set(r.id, { typing, online, reads });
    }
    for (const ev of typingOut) this._emit("onTyping", ev);
    for (const ev of presenceOut) this._emit("onPresence", ev);
    for (const ev of readOut) this._emit("onRead", ev);
  }
}

/**
 * A client of hark: `createClient({ token, getToken })`.
 * @param {ClientOptions} [options]
 */
export function createClient(options) {
  return new HarkClient(options);
}
