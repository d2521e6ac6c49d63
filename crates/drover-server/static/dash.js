// drover dashboard: live parts of the page over server-sent events, and
// the operator's actions (each confirmed, then sent to the JSON API).
// Plain JavaScript, no build step. The server renders (and escapes) all
// HTML; this only swaps a part's element for its new rendering.
(function () {
  'use strict';
  var live = document.getElementById('live');
  var notice = document.getElementById('notice');

  function setLive(on) {
    live.dataset.live = on ? 'on' : 'off';
    live.textContent = on ? '● live' : '○ reconnecting…';
  }

  function say(text, bad) {
    notice.hidden = false;
    notice.className = 'notice' + (bad ? ' bad' : '');
    notice.textContent = text;
  }

  var stream = document.body.dataset.stream;
  var es = null;

  function connect() {
    es = new EventSource(stream);
    es.onopen = function () { setLive(true); };
    es.onerror = function () {
      setLive(false);
      // The server refused the stream (signed out, token revoked): the
      // browser does not retry that; say so.
      if (es.readyState === EventSource.CLOSED) {
        live.textContent = '○ stopped';
        say('Live updates stopped: the server refused them (signed out?). Reload, or sign in again at /login.', true);
      }
    };
    // {"<element id>": "<html>"}: the parts that changed.
    es.addEventListener('parts', function (e) {
      var parts = JSON.parse(e.data);
      Object.keys(parts).forEach(function (id) {
        var el = document.getElementById(id);
        if (el) {
          el.innerHTML = parts[id];
        } else {
          say('This page changed shape (e.g. a new environment): reload to see all of it.');
        }
      });
      document.body.dataset.updates = String(Number(document.body.dataset.updates || '0') + 1);
    });
    // {"text": "..."}: new output of the run's log.
    es.addEventListener('log', function (e) {
      var log = document.getElementById('log');
      if (!log) return;
      var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.appendChild(document.createTextNode(JSON.parse(e.data).text));
      if (e.lastEventId) log.dataset.offset = e.lastEventId;
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
    es.addEventListener('failure', function (e) {
      say(JSON.parse(e.data).error, true);
    });
  }

  if (stream && window.EventSource) {
    connect();
    // Leaving the page closes its stream at once (a browser allows only a
    // few connections per server; a page kept in the back/forward cache
    // must not hold one). Coming back from that cache: fresh content.
    window.addEventListener('pagehide', function () { if (es) es.close(); });
    window.addEventListener('pageshow', function (e) { if (e.persisted) location.reload(); });
  }

  document.addEventListener('click', function (e) {
    var b = e.target.closest('button[data-action]');
    if (!b || b.disabled) return;
    var action = b.dataset.action, app = b.dataset.app, env = b.dataset.env;
    if (!window.confirm(b.dataset.question)) return;
    var body = action === 'rollback' ? { env: env } : { env: env, full: false };
    b.disabled = true;
    fetch('/v1/apps/' + encodeURIComponent(app) + '/' + action, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (!r.ok) {
          say(action + ' refused: ' + (j.error || r.status + ' ' + r.statusText), true);
        } else if (j.message) {
          say(j.message);
        } else if (j.release) {
          say(j.reverts ? 'rollback: rollout ' + j.rollout_id + ' reverts'
                        : 'rollback to ' + j.release + ' started (rollout ' + j.rollout_id + ')');
        } else {
          say(action + ': done');
        }
      });
    }).catch(function (err) {
      say(action + ' failed: ' + err, true);
    }).then(function () {
      b.disabled = false;
    });
  });
})();
