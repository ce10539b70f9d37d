"""The gateway's own front page (`GET /`): API docs and live model status, built from the live
route table so it can never drift from routes.yaml.

Pure: no aiohttp. Everything that comes from configuration or from a request is escaped with
`html.escape`; the base URL is either `gateway.public_url` or a sanitized scheme + host[:port]
from the request's headers. The page is self-contained (inline CSS and JS, no external
resources) and never shows a real key, an internal model id or an upstream address.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from html import escape

from .config import Route, RouteTable
from .endpoints import NONE, Endpoint, served
from .errors import error_table
from .stats import ModelWindow

PRODUCT = "MacLustr LLM API"
FALLBACK_BASE = "http://localhost:9000"
# The page loads nothing from anywhere; its script may only call this gateway (/health).
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\])(?::([0-9]{{1,5}}))?")


def _host_ok(host: str) -> bool:
    m = _HOST.fullmatch(host)
    if m is None or len(host) > 260:
        return False
    return m.group(1) is None or 0 < int(m.group(1)) < 65536


def base_url(public_url: str | None, headers: Mapping[str, str], scheme: str = "http") -> str:
    """The URL clients should use: `public_url` when configured, else what the request came in
    on (X-Forwarded-Proto/-Host first, as set by ngrok/Caddy/Nginx, then Host). Anything that is
    not a plausible scheme or host[:port] is ignored, never reflected."""
    if public_url:
        return public_url.rstrip("/")
    proto = headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if proto not in ("http", "https"):
        proto = scheme if scheme in ("http", "https") else "http"
    for name in ("X-Forwarded-Host", "Host"):
        host = headers.get(name, "").split(",")[0].strip()
        if host and _host_ok(host):
            return f"{proto}://{host}"
    return FALLBACK_BASE


def literal_html(text: str) -> str:
    """An error-table sentence as HTML: escaped, `backticks` as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


TROUBLE: tuple[tuple[str, str], ...] = (
    ("401 on every call",
     "The <code>Authorization: Bearer</code> header must carry a key from "
     "<code>MACLUSTR_API_KEY</code>."),
    ("404 model_not_found",
     "Use a valid alias: see the table above or <code>GET /v1/models</code>."),
    ("502", "The MLX model is still loading or down: check <code>/health?deep=true</code> "
     "(the status column above shows the same)."),
    ("504", "The model took longer than its timeout; retry, or ask the operator to raise "
     "<code>timeouts</code> in routes.yaml."),
    ("Slow first request",
     "The first call loads the model into memory; later calls are fast."),
)

_CSS = """
:root{--bg:#f7f7f9;--fg:#1b1d22;--muted:#5d6370;--card:#fff;--line:#e3e5ea;--code:#f1f2f5;
--accent:#3b5bdb;--up:#2b8a3e;--down:#c92a2a;--warn:#d9480f;--chip:#eef1fb;--on:#fff;
color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#121418;--fg:#e6e8ec;--muted:#9aa1ad;
--card:#1b1e24;--line:#2c3039;--code:#0d0f12;--accent:#8ea6ff;--up:#51cf66;--down:#ff6b6b;
--warn:#ffa94d;--chip:#232838;--on:#0b0d12}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.55 system-ui,-apple-system,
"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:960px;margin:0 auto;padding:24px 16px 48px}
header{padding:8px 0 4px}
.kicker{color:var(--muted);font-size:13px;letter-spacing:.04em;text-transform:uppercase}
h1{font-size:30px;margin:4px 0 8px;line-height:1.2}
h2{font-size:20px;margin:36px 0 10px;padding-top:8px;border-top:1px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}
p{margin:6px 0 10px}
.muted{color:var(--muted)}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin:12px 0}
.chip{background:var(--chip);border-radius:999px;padding:2px 10px;font-size:12.5px}
.endpoint{display:flex;flex-wrap:wrap;align-items:center;gap:8px;background:var(--card);
border:1px solid var(--line);border-radius:10px;padding:10px 12px;margin:8px 0}
.method{font:600 12px/1 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
border-radius:6px;padding:5px 7px;color:var(--on);background:var(--accent)}
.method.get{background:var(--up)}
.endpoint code{word-break:break-all}
.endpoint .what{color:var(--muted);font-size:13.5px;flex-basis:100%}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
:not(pre)>code{background:var(--code);border-radius:4px;padding:1px 5px}
.block{position:relative;margin:8px 0 14px}
pre{background:var(--code);border:1px solid var(--line);border-radius:10px;padding:14px 14px;
margin:0;overflow-x:auto;line-height:1.5;padding-right:76px}
.copy{position:absolute;top:8px;right:8px;font:12px system-ui,sans-serif;cursor:pointer;
background:var(--card);color:var(--fg);border:1px solid var(--line);border-radius:6px;
padding:3px 9px}
.copy:hover{border-color:var(--accent)}
.tabs{display:flex;gap:4px;flex-wrap:wrap;margin-top:10px}
.tab{font:inherit;font-size:13.5px;cursor:pointer;background:transparent;color:var(--muted);
border:1px solid var(--line);border-radius:8px;padding:4px 12px}
.tab[aria-selected=true]{background:var(--card);color:var(--fg);border-color:var(--accent)}
.panel[hidden]{display:none}
.table{overflow-x:auto;background:var(--card);border:1px solid var(--line);border-radius:10px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:9px 12px;border-bottom:1px solid var(--line);vertical-align:top}
tr:last-child td{border-bottom:0}
th{font-size:12.5px;color:var(--muted);font-weight:600;text-transform:uppercase;
letter-spacing:.03em}
td.alias{white-space:nowrap;font-weight:600}
.status{white-space:nowrap;font-size:13px}
.dot{display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:6px;
background:var(--muted);vertical-align:middle}
.status.up .dot{background:var(--up)}.status.down .dot{background:var(--down)}
.status.warn .dot{background:var(--warn)}
.status.up{color:var(--up)}.status.down{color:var(--down)}.status.warn{color:var(--warn)}
.kv{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:8px;margin:10px 0}
.kv div{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 12px}
.kv b{display:block;font-size:12px;color:var(--muted);font-weight:600;text-transform:uppercase}
.kv span{word-break:break-all}
footer{margin-top:40px;color:var(--muted);font-size:13px}
@media (max-width:600px){h1{font-size:24px}main{padding:16px 12px 40px}
td,th{padding:8px}pre{padding:40px 12px 12px}#model-table thead{display:none}
#model-table tr{display:grid;grid-template-columns:1fr auto;grid-template-areas:
"alias status" "purpose purpose" "params params";border-bottom:1px solid var(--line);
padding:4px 0}#model-table tr:last-child{border-bottom:0}
#model-table td{border:0;padding:3px 12px}#model-table td.alias{grid-area:alias}
#model-table td.purpose{grid-area:purpose}#model-table td.params{grid-area:params;
color:var(--muted)}#model-table td.st{grid-area:status}
#model-table td.params::after{content:" parameters"}}
"""

_JS = """
(function(){
  function copyText(text){
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    var ta = document.createElement('textarea');
    ta.value = text; ta.setAttribute('readonly', ''); ta.style.position = 'fixed';
    ta.style.opacity = '0'; document.body.appendChild(ta); ta.select();
    try { document.execCommand('copy'); } finally { document.body.removeChild(ta); }
    return Promise.resolve();
  }
  document.querySelectorAll('button.copy').forEach(function(btn){
    btn.addEventListener('click', function(){
      var code = document.getElementById(btn.getAttribute('data-for'));
      var text = code.textContent;
      document.body.setAttribute('data-copied', text);
      copyText(text).then(function(){ btn.textContent = 'Copied'; },
                          function(){ btn.textContent = 'Select & copy'; })
        .then(function(){ setTimeout(function(){ btn.textContent = 'Copy'; }, 1500); });
    });
  });
  document.querySelectorAll('.tabs').forEach(function(tabs){
    var buttons = tabs.querySelectorAll('.tab');
    buttons.forEach(function(tab){
      tab.addEventListener('click', function(){
        buttons.forEach(function(t){
          var on = t === tab;
          t.setAttribute('aria-selected', on ? 'true' : 'false');
          document.getElementById(t.getAttribute('aria-controls')).hidden = !on;
        });
      });
    });
  });
  var cells = document.querySelectorAll('[data-status-for]');
  var overall = document.getElementById('overall');
  function paint(cell, status){
    var cls = status === 'up' ? 'up' : status === 'down' ? 'down'
      : status === 'unknown' ? '' : 'warn';
    cell.className = 'status ' + cls;
    cell.textContent = '';
    var dot = document.createElement('span'); dot.className = 'dot';
    cell.appendChild(dot); cell.appendChild(document.createTextNode(status));
  }
  function refresh(){
    if (document.hidden) { setTimeout(refresh, 5000); return; }  // no pings for hidden tabs
    fetch('/health?deep=true', {cache: 'no-store', headers: {'Accept': 'application/json'}})
      .then(function(r){ return r.json(); })
      .then(function(h){
        var models = (h && typeof h.models === 'object' && h.models) || {};
        cells.forEach(function(cell){
          var m = models[cell.getAttribute('data-status-for')];
          var s = m && typeof m === 'object' ? m.status : (typeof m === 'string' ? m : null);
          s = typeof s === 'string' && s ? s : 'unknown';
          // a replica the healer has out (suspect, wedged, restarting) is named by its index
          var reps = m && typeof m === 'object' && Array.isArray(m.replicas) ? m.replicas : [];
          var out = [];
          reps.forEach(function(r, i){
            if (r && r.status && r.status !== 'up' && r.status !== s)
              out.push('replica ' + i + ' ' + r.status);
          });
          paint(cell, out.length ? s + ' (' + out.join(', ') + ')' : s);
        });
        if (overall) overall.textContent = 'Cluster: ' + String(h && h.status || 'unknown') +
          ' · checked ' + new Date().toLocaleTimeString();
      })
      .catch(function(){
        cells.forEach(function(cell){ paint(cell, 'unknown'); });
        if (overall) overall.textContent = 'Cluster: gateway unreachable';
      })
      .then(function(){ setTimeout(refresh, 5000); });
  }
  refresh();
})();
"""


class _Ids:
    """Unique element ids for code blocks, so copy buttons know what to copy."""

    def __init__(self) -> None:
        self.n = 0

    def block(self, code: str, label: str = "") -> str:
        self.n += 1
        cid = f"code-{self.n}"
        aria = f' aria-label="Copy {escape(label)}"' if label else ""
        return (f'<div class="block"><button class="copy" type="button" data-for="{cid}"{aria}>'
                f'Copy</button><pre><code id="{cid}">{escape(code)}</code></pre></div>')


def _examples(base: str, alias: str, fast: str) -> dict[str, str]:
    return {
        "curl": (
            f"curl {base}/v1/chat/completions -N \\\n"
            '  -H "Authorization: Bearer $MACLUSTR_API_KEY" \\\n'
            '  -H "Content-Type: application/json" \\\n'
            f'  -d \'{{"model": "{alias}", "messages": [{{"role": "user", '
            '"content": "Hello!"}], "stream": true}\''
        ),
        "python": (
            "# pip install openai\n"
            "import os\n"
            "from openai import OpenAI\n\n"
            f'client = OpenAI(base_url="{base}/v1", api_key=os.environ["MACLUSTR_API_KEY"])\n\n'
            "stream = client.chat.completions.create(\n"
            f'    model="{alias}",\n'
            '    messages=[{"role": "user", "content": "Hello!"}],\n'
            "    stream=True,\n"
            ")\n"
            "for chunk in stream:\n"
            '    print(chunk.choices[0].delta.content or "", end="")'
        ),
        "javascript": (
            "// npm i openai\n"
            'import OpenAI from "openai";\n\n'
            "const client = new OpenAI({\n"
            f'  baseURL: "{base}/v1",\n'
            "  apiKey: process.env.MACLUSTR_API_KEY,\n"
            "});\n\n"
            "const res = await client.chat.completions.create({\n"
            f'  model: "{fast}",\n'
            '  messages: [{ role: "user", content: "Hello!" }],\n'
            "});\n"
            "console.log(res.choices[0].message.content);"
        ),
    }


def render_page(table: RouteTable, base_url: str,
                load: Mapping[str, ModelWindow] | None = None) -> str:
    """The whole HTML page for this table, with `base_url` (already chosen) in every example.
    `load`: per alias, the last minute's figures (the same counters as /metrics); None when
    metrics are off."""
    base = base_url.rstrip("/")
    ids = _Ids()  # numbers the copy buttons in page order: call the sections in that order
    sections = [
        _header(table, base),
        _quick_start(table, base, ids),
        _models(table, load),
        _overview(base),
        _auth(ids),
        _endpoints(table, base, ids),
        _errors(table, ids),
        _troubleshooting(),
        f"<footer>{PRODUCT} · OpenAI-compatible · {escape(base)}</footer>",
    ]
    body = "\n\n".join(sections)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{PRODUCT}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
{body}
</main>
<script>{_JS}</script>
</body>
</html>
"""


def _header(table: RouteTable, base: str) -> str:
    n = len(table.aliases)
    models_word = "model" if n == 1 else "models"
    return f"""<header>
<div class="kicker">Private AI cloud · MacLustr cluster</div>
<h1>{PRODUCT}</h1>
<p>One clean, OpenAI-compatible endpoint that routes to {n} local MLX {models_word}.
Bring your favourite OpenAI client — just change the base URL.</p>
<div class="endpoint"><span class="method">POST</span>
<code id="base-chat">{escape(base)}/v1/chat/completions</code></div>
<div class="chips"><span class="chip">OpenAI-compatible</span>
<span class="chip">Streaming (SSE)</span><span class="chip">Bearer auth</span>
<span class="chip">{n} routed {models_word}</span><span class="chip">100% local</span></div>
</header>"""


def _quick_start(table: RouteTable, base: str, ids: _Ids) -> str:
    """The first request in curl, Python and JavaScript, one tab each."""
    aliases = table.aliases
    fast = next((a for a in aliases if "fast" in a), aliases[-1])
    ex = _examples(base, aliases[0], fast)
    tabs = []
    panels = []
    for i, (key, label) in enumerate((("curl", "curl"), ("python", "Python"),
                                      ("javascript", "JavaScript"))):
        on = i == 0
        tabs.append(f'<button class="tab" type="button" role="tab" id="tab-{key}" '
                    f'aria-controls="panel-{key}" aria-selected="{"true" if on else "false"}">'
                    f"{label}</button>")
        panels.append(f'<div class="panel" role="tabpanel" id="panel-{key}" '
                      f'aria-labelledby="tab-{key}"{"" if on else " hidden"}>'
                      f"{ids.block(ex[key], label)}</div>")
    return f"""<h2 id="quick-start">Quick start</h2>
<p>Send your first request in seconds. Set <code>MACLUSTR_API_KEY</code> to the key you were
given.</p>
<div class="tabs" role="tablist">{"".join(tabs)}</div>
{"".join(panels)}"""


def _models(table: RouteTable, load: Mapping[str, ModelWindow] | None) -> str:
    """The alias table; the page's script fills in each status."""
    e = escape

    def last_minute(alias: str) -> str:
        w = load.get(alias) if load is not None else None
        if w is None:
            return ""
        n = int(w.requests)
        ttft = f" · TTFT p50 {w.ttft_p50 * 1e3:.0f} ms" if w.ttft_p50 is not None else ""
        return (f'<br><span class="muted load" data-load-for="{e(alias)}">'
                f'{n} request{"" if n == 1 else "s"} in the last minute{ttft}</span>')

    def placement(r: Route) -> str:
        return f'<br><span class="muted placement">{e(r.placement)}</span>' if r.shards else ""

    rows = "".join(
        f'<tr data-alias="{e(r.alias)}"><td class="alias"><code>{e(r.alias)}</code></td>'
        f"<td class=\"purpose\">{e(r.description) or '—'}{placement(r)}</td>"
        f"<td class=\"params\">{e(r.parameters) or '—'}</td>"
        f'<td class="st"><span class="status" data-status-for="{e(r.alias)}">'
        f'<span class="dot"></span>checking…</span>{last_minute(r.alias)}</td></tr>'
        for r in table.routes
    )
    return f"""<h2 id="models">Models</h2>
<p>Use these public aliases in the <code>model</code> field; responses report the alias.
The status column refreshes every few seconds from <code>/health?deep=true</code>.</p>
<div class="table"><table id="model-table">
<thead><tr><th>Alias</th><th>Purpose</th><th>Parameters</th><th>Status</th></tr></thead>
<tbody>{rows}</tbody></table></div>
<p class="muted" id="overall">Cluster: checking…</p>"""


def _overview(base: str) -> str:
    return f"""<h2 id="overview">Overview</h2>
<div class="kv">
<div><b>Base URL</b><span id="base-url">{escape(base)}</span></div>
<div><b>Protocol</b>OpenAI <code>/v1</code> API</div>
<div><b>Auth</b>Bearer token</div>
<div><b>Transport</b>JSON · SSE streaming</div>
</div>
<p>Requests are authenticated, routed by the <code>model</code> field to the right MLX server,
and answered in the standard OpenAI format — streaming or not.</p>"""


def _auth(ids: _Ids) -> str:
    return f"""<h2 id="auth">Authentication</h2>
<p>All <code>/v1</code> routes need a bearer token:</p>
{ids.block("Authorization: Bearer $MACLUSTR_API_KEY", "header")}
<p class="muted">Requests without a valid key get <code>401</code> with a JSON error.</p>"""


def _endpoints(table: RouteTable, base: str, ids: _Ids) -> str:
    """Every endpoint this gateway serves (endpoints.ENDPOINTS), then two ready commands."""
    def endpoint(ep: Endpoint) -> str:
        lock = "no auth" if ep.auth == NONE or (
            ep.operation == "metrics" and table.settings.metrics_public) else ep.auth
        return (f'<div class="endpoint"><span class="method {ep.method.lower()}">{ep.method}'
                f"</span><code>{escape(base)}{escape(ep.path)}</code>"
                f"<span class=\"chip\">{lock}</span>"
                f'<span class="what">{literal_html(ep.summary)}.</span></div>')

    # /v1/usage answers 404 while the ledger is off, so the page leaves it out then
    endpoints = "".join(endpoint(ep) for ep in served(table.settings.metrics)
                        if ep.operation != "usage" or table.settings.usage_db is not False)
    return f"""<h2 id="endpoints">Endpoints</h2>
{endpoints}
<h3>List models</h3>
{ids.block(f'curl {base}/v1/models -H "Authorization: Bearer $MACLUSTR_API_KEY"', "models")}
<h3>Health check</h3>
{ids.block(f'curl "{base}/health?deep=true"', "health")}"""


def _errors(table: RouteTable, ids: _Ids) -> str:
    """The envelope and the error table (errors.py)."""
    envelope = ('{\n  "error": {\n    "message": "Model \'foo\' not found. Available models: '
                f'{table.aliases[0]}, ...",\n    "type": "invalid_request_error",\n'
                '    "code": "model_not_found",\n    "param": "model"\n  }\n}')
    err_rows = "".join(f"<tr><td><b>{r.status}</b></td><td><code>{r.code}</code></td>"
                       f"<td>{literal_html(r.meaning)}</td></tr>" for r in error_table())
    return f"""<h2 id="errors">Errors</h2>
<p>Errors use the OpenAI envelope; messages name public aliases only.</p>
{ids.block(envelope, "error example")}
<div class="table"><table>
<thead><tr><th>Status</th><th>Code</th><th>Meaning</th></tr></thead>
<tbody>{err_rows}</tbody></table></div>
<p class="muted">Once a stream has started, a failure ends it with one final
<code>data: {{"error": {{…}}}}</code> event, which the OpenAI SDKs raise as an error.</p>"""


def _troubleshooting() -> str:
    trouble_rows = "".join(f"<tr><td><b>{s}</b></td><td>{f}</td></tr>" for s, f in TROUBLE)
    return f"""<h2 id="troubleshooting">Troubleshooting</h2>
<div class="table"><table>
<thead><tr><th>Symptom</th><th>Fix</th></tr></thead>
<tbody>{trouble_rows}</tbody></table></div>"""
