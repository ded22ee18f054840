package supervisor

import "net/http"

// dashboardHTML is the admin port's page: the process table, refreshed
// every 2 s from /api/cluster. No external assets, so it works offline.
const dashboardHTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shoal</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}th,td{padding:.3em .8em;text-align:left;border-bottom:1px solid #ddd}
th{background:#f4f4f4}.ready{color:#080}.dead,.failed{color:#b00;font-weight:bold}.draining,.starting{color:#a60}
#err{color:#b00}small{color:#666}
</style></head><body>
<h1>Shoal <small id="node"></small></h1>
<p id="urls"></p><p id="err"></p>
<table><thead><tr><th>name</th><th>role</th><th>pid</th><th>state</th><th>restarts</th><th>uptime</th>
<th>connections</th><th>rss</th><th>goroutines</th><th>last exit</th></tr></thead><tbody id="rows"></tbody></table>
<p><small><a href="/api/cluster">/api/cluster</a> · <a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a></small></p>
<script>
function cell(tr, text, cls){const td=document.createElement('td');td.textContent=text;if(cls)td.className=cls;tr.appendChild(td)}
function dur(s){s=Math.floor(s);const h=Math.floor(s/3600),m=Math.floor(s%3600/60);return (h?h+'h':'')+(h||m?m+'m':'')+(s%60)+'s'}
async function refresh(){
  try{
    const r=await fetch('/api/cluster');const c=await r.json();
    document.getElementById('node').textContent=c.node+' · supervisor pid '+c.supervisor_pid+' · up '+dur(c.uptime);
    document.getElementById('urls').textContent=c.public+'   log: '+c.log;
    const rows=document.getElementById('rows');rows.replaceChildren();
    for(const p of c.processes){const tr=document.createElement('tr');
      cell(tr,p.name);cell(tr,p.role);cell(tr,p.pid||'-');cell(tr,p.state,p.state);cell(tr,p.restarts);
      cell(tr,p.uptime?dur(p.uptime):'-');cell(tr,p.connections);cell(tr,p.rss_bytes?(p.rss_bytes/1048576).toFixed(1)+' MiB':'-');
      cell(tr,p.goroutines||'-');cell(tr,p.last_exit||'-');rows.appendChild(tr)}
    document.getElementById('err').textContent='';
  }catch(e){document.getElementById('err').textContent='supervisor not answering: '+e}
}
refresh();setInterval(refresh,2000);
</script></body></html>
`

func (s *Supervisor) handleDashboard(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = w.Write([]byte(dashboardHTML))
}
