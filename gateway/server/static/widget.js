// GatewayChat: a small browser client for the gateway's visitor protocol
// (docs/protocol.md), JSON text frames over WebSocket. No dependencies.
//
//   const chat = new GatewayChat({url, token, tags, onDeliver, onState, onError});
//   chat.connect();
//   const n = await chat.send("hello");   // resolves with the gateway's n once acked
//   await chat.refresh(newToken);         // resolves once the gateway confirmed it
//   chat.close();
//
// onDeliver(frame) gets each `deliver` once, in seq order; onState(s) gets
// "connecting" | "open" | "reconnecting" | "closed"; onError(frame) gets
// terminal `error` frames (code >= 4500), after which pending sends reject.
//
// Reconnects with resume {sid, last} after drops, goaway and reconnect-class
// codes (4000-4499, 1001, 1006, 1011), with exponential backoff and full
// jitter (or the gateway's reconnect_after / retry_after); unacknowledged
// messages are re-sent with their ids (the gateway deduplicates) and
// deliveries already seen are skipped. Deliveries are acknowledged
// cumulatively (every 4, or 200 ms after the last one). The browser answers
// the gateway's WebSocket pings itself; the widget also sends a `ping` when it
// has sent nothing for `hb` and drops a link silent for 2 * hb + 5 s.
"use strict";

class GatewayChat {
  constructor(opts) {
    this.url = opts.url || GatewayChat.defaultUrl();
    this.token = opts.token;
    this.tags = opts.tags || {};
    this.platform = opts.platform || "web";
    this.onDeliver = opts.onDeliver || (() => {});
    this.onState = opts.onState || (() => {});
    this.onError = opts.onError || (() => {});
    this.maxBackoffMs = opts.maxBackoffMs || 30000;
    this.sid = null;
    this.exp = null;
    // the gateway's sticky ticket (who served this visitor), kept across
    // page loads so that the next session goes back to them
    this.stickyKey = opts.stickyKey || "gateway-chat-sticky";
    this.sticky = GatewayChat._load(this.stickyKey);
    this.lastSeq = 0; // highest seq handed to onDeliver
    this.ackedSeq = 0; // highest seq acknowledged to the gateway
    this.nextId = 1;
    this.pending = new Map(); // id -> {body, resolve, reject}; at most `window` sent
    this.refreshes = []; // resolvers waiting for `refreshed`
    this.attempt = 0;
    this.ws = null;
    this.open = false;
    this.stopped = false;
    this.failed = null; // terminal Error, once any
    this.hbMs = 25000;
    this.lastRx = 0;
    this.lastTx = 0;
    this.reconnectAfterMs = null; // from goaway / retry_after, used once
    this.ackTimer = null;
    this.hbTimer = null;
  }

  static _load(key) {
    try {
      return window.localStorage.getItem(key);
    } catch (e) {
      return null; // storage off (private mode, a sandboxed frame)
    }
  }

  static defaultUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return `${proto}//${location.host}/v1/ws`;
  }

  get sessionId() {
    return this.sid;
  }

  connect() {
    this.stopped = false;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.onState(this.attempt ? "reconnecting" : "connecting");
    ws.onopen = () => {
      const hello = { t: "hello", v: 1, token: this.token, platform: this.platform };
      if (Object.keys(this.tags).length) hello.tags = this.tags;
      if (this.sid) hello.resume = { sid: this.sid, last: this.lastSeq };
      if (this.sticky) hello.sticky = this.sticky;
      this.lastRx = Date.now();
      this._write(hello);
      this._heartbeat();
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this.lastRx = Date.now();
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch (e) {
        ws.close(); // a broken gateway: drop the link, reconnect
        return;
      }
      this._onFrame(f);
    };
    ws.onclose = (ev) => {
      if (ws === this.ws) this._onClose(ev.code, ev.reason);
    };
  }

  send(body) {
    if (this.failed) return Promise.reject(this.failed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { body, resolve, reject });
      if (this.open) this._write({ t: "msg", id, body });
    });
  }

  refresh(token) {
    this.token = token; // also used by every later hello
    if (!this.open) return Promise.resolve();
    return new Promise((resolve) => {
      this.refreshes.push(resolve);
      this._write({ t: "refresh", token });
    });
  }

  close() {
    this.stopped = true;
    this._flushAck();
    if (this.ws) this.ws.close(1000);
  }

  _write(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      this.lastTx = Date.now();
    }
  }

  _onFrame(f) {
    switch (f.t) {
      case "welcome":
        this.open = true;
        this.attempt = 0;
        if (!f.resumed) {
          this.lastSeq = 0;
          this.ackedSeq = 0;
        }
        if (f.resync) this.lastSeq = Math.max(this.lastSeq, f.first - 1);
        this.sid = f.sid;
        this.exp = f.exp;
        if (f.hb) this.hbMs = f.hb;
        this.onState("open");
        for (const [id, p] of this.pending) this._write({ t: "msg", id, body: p.body });
        break;
      case "ack": {
        const p = this.pending.get(f.id);
        if (p) {
          this.pending.delete(f.id);
          p.resolve(f.n);
        }
        break;
      }
      case "deliver":
        if (f.seq > this.lastSeq) {
          this.lastSeq = f.seq;
          this.onDeliver(f);
        }
        if (this.lastSeq - this.ackedSeq >= 4) this._flushAck();
        else if (this.lastSeq > this.ackedSeq && this.ackTimer === null) {
          this.ackTimer = setTimeout(() => this._flushAck(), 200);
        }
        break;
      case "ping":
        this._write({ t: "pong", ts: f.ts || 0 });
        break;
      case "sticky":
        if (typeof f.ticket === "string") {
          this.sticky = f.ticket;
          try {
            window.localStorage.setItem(this.stickyKey, f.ticket);
          } catch (e) {
            // storage off: the ticket lasts as long as the page
          }
        }
        break;
      case "refreshed":
        this.exp = f.exp;
        for (const resolve of this.refreshes.splice(0)) resolve(f.exp);
        break;
      case "goaway":
        this.reconnectAfterMs = f.reconnect_after || 0;
        this._drop();
        break;
      case "error":
        if ((f.code === 4409 || f.code === 4029 || f.code === 4429) && this.pending.has(f.id)) {
          // this message was refused, not the connection: send it again
          const id = f.id;
          setTimeout(() => {
            const p = this.pending.get(id);
            if (p && this.open) this._write({ t: "msg", id, body: p.body });
          }, f.retry_after || 100);
        } else if (f.code >= 4500) {
          this._fail(new Error(`${f.code} ${f.reason}`));
          this.onError(f);
        } else if (f.retry_after) {
          this.reconnectAfterMs = f.retry_after;
        }
        break;
    }
  }

  _flushAck() {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.lastSeq > this.ackedSeq && this.open) {
      this.ackedSeq = this.lastSeq;
      this._write({ t: "ack", seq: this.lastSeq });
    }
  }

  _heartbeat() {
    clearTimeout(this.hbTimer);
    this.hbTimer = setTimeout(() => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      const now = Date.now();
      if (now - this.lastRx > this.hbMs * 2 + 5000) {
        this._drop(); // silent link: treat as lost
        return;
      }
      if (this.open && now - this.lastTx >= this.hbMs) this._write({ t: "ping", ts: now });
      this._heartbeat();
    }, Math.min(this.hbMs, 5000));
  }

  // Leave the current socket now and reconnect (goaway, dead link).
  _drop() {
    const ws = this.ws;
    this.ws = null; // its onclose is ignored from now on
    if (ws) ws.close(1000);
    this._onClose(1006, "dropped");
  }

  _fail(err) {
    this.failed = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const resolve of this.refreshes.splice(0)) resolve(null);
  }

  _onClose(code, reason) {
    this.open = false;
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    clearTimeout(this.hbTimer);
    for (const resolve of this.refreshes.splice(0)) resolve(null); // next hello carries it
    const terminal = code >= 4500 || [1002, 1007, 1008, 1009].includes(code);
    if (terminal && !this.failed) this._fail(new Error(`${code} ${reason}`));
    if (this.stopped || this.failed || code === 1000) {
      this.ws = null;
      this.onState("closed");
      return;
    }
    let delay = this.reconnectAfterMs;
    if (delay === null) {
      const cap = Math.min(this.maxBackoffMs, 200 * 2 ** Math.min(this.attempt, 20));
      delay = Math.random() * cap; // full jitter
    }
    this.reconnectAfterMs = null;
    this.attempt++;
    this.onState("reconnecting");
    setTimeout(() => {
      if (!this.stopped) this.connect();
    }, delay);
  }
}

if (typeof window !== "undefined") window.GatewayChat = GatewayChat;
