/* Mayak web chat widget. No framework, no build step. Protocol: docs/webchat.md.
 *
 * <script src="https://mayak.example.com/widget.js" data-channel="ch_…" data-key="wk_…"
 *         data-user-token="…" data-title="…" async></script>
 *
 * Every text is set with textContent (never innerHTML); the UI lives in a shadow root so the
 * site's CSS does not leak in. Messages stay queued (also across reloads) until the server acks them.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.MayakChat) return;
  var opt = script.dataset;
  var channel = opt.channel || "";
  var src = new URL(script.src, location.href);
  var wsUrl = (opt.server ? new URL(opt.server, location.href) : src);
  wsUrl = (wsUrl.protocol === "https:" ? "wss://" : "ws://") + wsUrl.host +
    "/v1/webchat/" + encodeURIComponent(channel) + "/ws";
  var VISITOR_KEY = "mayak.visitor_id", PENDING_KEY = "mayak.pending." + channel;
  var CHATTED_KEY = "mayak.chatted." + channel;
  var FATAL = { 4400: 1, 4401: 1, 4403: 1, 4404: 1, 4410: 1 };
  var userToken = opt.userToken || null;
  var ws = null, welcomed = false, attempts = 0, timer = null, retry = null, inflight = null, lastSeen = 0;
  var pending = load(PENDING_KEY, []), isOpen = false, stopped = false, greeting = null;

  function store(k, v) { try { localStorage.setItem(k, JSON.stringify(v)); } catch (e) { /* private mode */ } }
  function load(k, d) {
    try { var v = localStorage.getItem(k); return v === null ? d : JSON.parse(v); } catch (e) { return d; }
  }
  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = new Uint8Array(16); crypto.getRandomValues(b);
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }
  function visitorId() {
    var v = opt.visitorId || load(VISITOR_KEY, null);
    if (typeof v !== "string" || !/^[A-Za-z0-9_-]{8,100}$/.test(v)) { v = uuid(); store(VISITOR_KEY, v); }
    return v;
  }

  // -- the UI ------------------------------------------------------------------------------------
  var host = document.createElement("div");
  host.setAttribute("data-mayak-chat", "");
  var root = host.attachShadow({ mode: "open" });
  var css = document.createElement("style");
  css.textContent = [
    ":host{all:initial;position:fixed;right:20px;bottom:20px;z-index:2147483000;font:14px/1.4 system-ui,sans-serif}",
    ".fab{width:56px;height:56px;border-radius:50%;border:0;background:#1d4ed8;color:#fff;font-size:26px;",
    "cursor:pointer;box-shadow:0 4px 12px rgba(0,0,0,.25);position:relative}",
    ".dot{position:absolute;top:4px;right:4px;width:12px;height:12px;border-radius:50%;background:#ef4444;display:none}",
    ".unread .dot{display:block}",
    ".panel{display:none;flex-direction:column;position:absolute;right:0;bottom:68px;width:340px;max-width:calc(100vw - 40px);",
    "height:480px;max-height:calc(100vh - 100px);background:#fff;color:#111;border-radius:12px;overflow:hidden;",
    "box-shadow:0 8px 30px rgba(0,0,0,.3)}",
    ".open .panel{display:flex}",
    ".head{display:flex;align-items:center;justify-content:space-between;padding:10px 14px;background:#1d4ed8;color:#fff;font-weight:600}",
    ".head button{background:none;border:0;color:#fff;font-size:20px;cursor:pointer}",
    ".status{font-size:12px;padding:2px 14px;color:#92400e;background:#fef3c7;display:none}",
    ".status.on{display:block}",
    ".log{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:6px;background:#f8fafc}",
    ".msg{max-width:80%;padding:7px 11px;border-radius:14px;white-space:pre-wrap;word-wrap:break-word}",
    ".in{align-self:flex-end;background:#1d4ed8;color:#fff;border-bottom-right-radius:4px}",
    ".out{align-self:flex-start;background:#e5e7eb;border-bottom-left-radius:4px}",
    ".pending{opacity:.6}.failed{background:#b91c1c}",
    ".btns{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}",
    ".btns button,.btns a{font:inherit;padding:5px 10px;border-radius:14px;border:1px solid #1d4ed8;",
    "background:#fff;color:#1d4ed8;cursor:pointer;text-decoration:none}",
    "form{display:flex;border-top:1px solid #e5e7eb}",
    "textarea{flex:1;border:0;padding:10px;font:inherit;resize:none;height:40px;outline:none}",
    "form button{border:0;background:none;color:#1d4ed8;font-weight:600;padding:0 14px;cursor:pointer}"
  ].join("");
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  var wrap = el("div", "wrap");
  var fab = el("button", "fab");
  fab.setAttribute("aria-label", "Open chat"); fab.type = "button";
  // A speech bubble drawn as SVG: emoji fonts are missing on many systems.
  var svgNs = "http://www.w3.org/2000/svg";
  var icon = document.createElementNS(svgNs, "svg");
  icon.setAttribute("viewBox", "0 0 24 24"); icon.setAttribute("width", "26"); icon.setAttribute("height", "26");
  var iconPath = document.createElementNS(svgNs, "path");
  iconPath.setAttribute("fill", "currentColor");
  iconPath.setAttribute("d", "M4 3h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z");
  icon.appendChild(iconPath); fab.appendChild(icon);
  fab.appendChild(el("span", "dot"));
  var panel = el("div", "panel");
  panel.setAttribute("role", "dialog");
  var head = el("div", "head");
  var title = el("span", "", opt.title || "Chat");
  var closeBtn = el("button", "", "\u00D7");
  closeBtn.type = "button"; closeBtn.setAttribute("aria-label", "Close chat");
  head.appendChild(title); head.appendChild(closeBtn);
  var status = el("div", "status");
  var logEl = el("div", "log");
  logEl.setAttribute("aria-live", "polite");
  var form = el("form");
  var input = el("textarea");
  input.setAttribute("aria-label", "Message"); input.placeholder = "Type a message…"; input.maxLength = 10000;
  var sendBtn = el("button", "", "Send"); sendBtn.type = "submit";
  form.appendChild(input); form.appendChild(sendBtn);
  panel.appendChild(head); panel.appendChild(status); panel.appendChild(logEl); panel.appendChild(form);
  wrap.appendChild(panel); wrap.appendChild(fab);
  root.appendChild(css); root.appendChild(wrap);

  function setStatus(text) { status.textContent = text || ""; status.className = text ? "status on" : "status"; }
  function scroll() { logEl.scrollTop = logEl.scrollHeight; }
  function safeUrl(u) {
    try { var p = new URL(u, location.href).protocol; return /^(https?|mailto|tel):$/.test(p) ? u : null; }
    catch (e) { return null; }
  }
  function bubble(direction, text, buttons, cls) {
    var b = el("div", "msg " + direction + (cls ? " " + cls : ""), text);
    if (buttons && buttons.length) {
      var row = el("div", "btns");
      buttons.forEach(function (btn) {
        var url = btn.url ? safeUrl(btn.url) : null, e;
        if (btn.url && !url) return;
        if (url) {
          e = el("a", "", btn.title); e.href = url; e.target = "_blank"; e.rel = "noopener noreferrer";
        } else {
          e = el("button", "", btn.title); e.type = "button";
          e.addEventListener("click", function () { press(btn); });
        }
        row.appendChild(e);
      });
      b.appendChild(row);
    }
    logEl.appendChild(b);
    scroll();
    return b;
  }
  function showGreeting() { if (greeting && !logEl.firstChild) bubble("out", greeting); }

  function open() {
    isOpen = true; wrap.className = "wrap open";
    connect();
    showGreeting();
    setTimeout(function () { input.focus(); }, 0);
  }
  function close() { isOpen = false; wrap.className = "wrap"; }
  fab.addEventListener("click", function () { if (isOpen) close(); else open(); });
  closeBtn.addEventListener("click", close);
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = input.value;
    if (!text.trim()) return;
    input.value = "";
    enqueue({ type: "message", text: text, client_id: uuid() }, text);
  });
  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit ? form.requestSubmit() : form.dispatchEvent(new Event("submit")); }
  });
  function press(btn) {
    if (btn.payload === undefined || btn.payload === null) return;
    enqueue({ type: "button", payload: String(btn.payload), title: btn.title, client_id: uuid() }, btn.title);
  }

  // -- the queue: every message stays here until acked -------------------------------------------
  var bubbles = {};
  function enqueue(frame, shown) {
    pending.push(frame); store(PENDING_KEY, pending); store(CHATTED_KEY, true);
    bubbles[frame.client_id] = bubble("in", shown, null, "pending");
    connect();
    pump();
  }
  function pump() {
    if (!ws || !welcomed || inflight || !pending.length) return;
    inflight = pending[0].client_id;
    ws.send(JSON.stringify(pending[0]));
    timer = setTimeout(function () { if (ws) ws.close(); }, 15000); // no ack: the socket is dead
  }
  function settle(clientId, failed) {
    pending = pending.filter(function (f) { return f.client_id !== clientId; });
    store(PENDING_KEY, pending);
    var b = bubbles[clientId];
    if (b) b.className = "msg in" + (failed ? " failed" : "");
    delete bubbles[clientId];
    if (inflight === clientId) { inflight = null; clearTimeout(timer); }
    pump();
  }

  // -- the socket --------------------------------------------------------------------------------
  function connect() {
    if (stopped || ws) return;
    clearTimeout(retry);
    welcomed = false; inflight = null;
    var sock = new WebSocket(wsUrl);
    ws = sock;
    sock.onopen = function () {
      var hello = {
        type: "hello", visitor_id: visitorId(), write_key: opt.key || "",
        context: { locale: navigator.language, page: { url: location.href, title: document.title, referrer: document.referrer } }
      };
      try { hello.context.timezone = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { /* old browser */ }
      if (userToken) hello.user_token = userToken;
      sock.send(JSON.stringify(hello));
    };
    sock.onmessage = function (ev) {
      if (sock !== ws) return;
      lastSeen = Date.now();
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      if (f.type === "welcome") onWelcome(f);
      else if (f.type === "message") { bubble("out", f.text, f.buttons); if (!isOpen) wrap.className = "wrap unread"; }
      else if (f.type === "ack") settle(f.client_id, false);
      else if (f.type === "error") onError(f);
    };
    sock.onclose = function (ev) {
      if (sock !== ws) return;
      ws = null; welcomed = false; inflight = null; clearTimeout(timer);
      if (FATAL[ev.code]) { stopped = true; return; }
      var delay = Math.min(30000, 500 * Math.pow(2, attempts++)) * (0.5 + Math.random() / 2);
      setStatus("Reconnecting…");
      retry = setTimeout(connect, delay);
    };
  }
  function onWelcome(f) {
    welcomed = true; attempts = 0; setStatus("");
    if (f.config) {
      if (!opt.title && f.config.title) title.textContent = f.config.title;
      greeting = f.config.greeting || null;
    }
    var seen = {};
    while (logEl.firstChild) logEl.removeChild(logEl.firstChild);
    showGreeting();
    (f.history || []).forEach(function (m) {
      if (m.client_id) seen[m.client_id] = 1;
      bubble(m.direction === "in" ? "in" : "out", m.text, m.direction === "in" ? null : m.buttons);
    });
    var keep = [];
    bubbles = {};
    pending.forEach(function (p) { // stored before the connection dropped, ack lost: already shown
      if (seen[p.client_id]) return;
      keep.push(p);
      bubbles[p.client_id] = bubble("in", p.type === "button" ? p.title : p.text, null, "pending");
    });
    pending = keep; store(PENDING_KEY, pending);
    pump();
  }
  function onError(f) {
    if (f.code === "rate_limited" || f.code === "storage_error") {
      if (inflight === f.client_id) {
        var s = ws;
        clearTimeout(timer);
        setTimeout(function () { if (ws === s && inflight === f.client_id) { inflight = null; pump(); } },
          f.retry_after_ms || 1000);
      }
    } else if (f.client_id) {
      settle(f.client_id, true);
    } else {
      setStatus(f.message || f.code);
    }
  }
  setInterval(function () {
    if (!ws || ws.readyState !== 1) return;
    if (Date.now() - lastSeen > 60000) { ws.close(); return; }
    ws.send('{"type":"ping"}');
  }, 25000);

  window.MayakChat = {
    open: open,
    close: close,
    setUserToken: function (t) { userToken = t || null; stopped = false; if (ws) ws.close(); else if (isOpen) connect(); },
    reset: function () { // on logout: a new visitor, nothing of the old conversation kept
      store(VISITOR_KEY, uuid()); pending = []; store(PENDING_KEY, []); userToken = null;
      store(CHATTED_KEY, false); while (logEl.firstChild) logEl.removeChild(logEl.firstChild);
      stopped = false; if (ws) ws.close();
    }
  };
  function mount() {
    document.body.appendChild(host);
    if (opt.open === "true") open();
    else if (load(CHATTED_KEY, false) || pending.length || opt.connect === "eager") connect();
  }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
})();
