// candor label: the team's status page (leads only). Text is written with textContent only.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  const fixed = (x, d) => (x === null || x === undefined) ? "–" : x.toFixed(d);

  function table(id, head, rows) {
    const t = $(id);
    t.replaceChildren();
    const tr = document.createElement("tr");
    for (const h of head) { const th = document.createElement("th"); th.textContent = h; tr.append(th); }
    t.append(tr);
    for (const row of rows) {
      const r = document.createElement("tr");
      for (const cell of row) { const td = document.createElement("td"); td.textContent = String(cell); r.append(td); }
      t.append(r);
    }
  }

  async function load() {
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    $("back").href = "/" + (token ? "#token=" + encodeURIComponent(token) : "");
    let r;
    try { r = await fetch("/api/stats", { headers }); }
    catch (_) { $("message").textContent = "Cannot reach the server."; return; }
    const data = await r.json().catch(() => ({}));
    if (r.status !== 200) { $("message").textContent = data.error || ("The server answered " + r.status + "."); return; }
    const p = data.progress, s = data.stats;
    $("fill").style.width = (p.team_needed ? 100 * p.team_done / p.team_needed : 0).toFixed(1) + "%";
    $("progress-text").textContent = p.team_done + " of " + p.team_needed + " rankings (" + p.prompts +
      " prompts, each by " + p.overlap + ")";
    $("files").textContent = data.input + " → " + data.out;
    table("labellers", ["labeller", "rankings", "seconds", "median s", "with ties", "harmful", "untruthful", "off-topic", "comments"],
      s.labellers.map((l) => [l.name, l.rankings, l.seconds.toFixed(1), fixed(l.median_seconds, 1), l.with_ties,
        l.flags.harmful || 0, l.flags.untruthful || 0, l.flags.off_topic || 0, l.comments]));
    const rows = s.pairwise.map((a) => [a.a + " / " + a.b, a.prompts, a.pairs, fixed(a.agreement, 3), fixed(a.tau_b, 3)]);
    if (s.team) rows.push(["team", s.team.prompts, s.team.pairs, fixed(s.team.agreement, 3), fixed(s.team.tau_b, 3)]);
    table("agreement", ["labellers", "prompts", "pairs", "agreement", "τ-b"], rows);
    table("flags", ["flag", "responses flagged"], Object.entries(s.flags));
    $("figures").hidden = false;
    setTimeout(load, 10000);
  }
  load();
})();
