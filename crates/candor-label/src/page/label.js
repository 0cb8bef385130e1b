// candor label: the labelling page. Prompts and responses are model or user text: they are
// only ever written with textContent, never parsed as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  // [flag, label, key]
  const FLAGS = [["harmful", "harmful", "h"], ["untruthful", "untruthful", "u"], ["off_topic", "off-topic", "o"]];

  let item = null;    // {id, prompt, responses}
  let groups = [];    // response indices, best group first; a group of several is a tie
  let flags = [];     // per response: a Set of flags
  let selected = 0;   // the selected response (keyboard)
  let shownAt = 0;
  let busy = false;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = {};
    try { data = await r.json(); } catch (_) { /* not JSON */ }
    return { status: r.status, data };
  }

  function say(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = kind || "";
  }

  function label(i) { return i < 26 ? String.fromCharCode(65 + i) : String(i + 1); }
  function ordinal(n) {
    const s = (n % 100 >= 11 && n % 100 <= 13) ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th");
    return n + s;
  }
  function where(r) {
    for (let g = 0; g < groups.length; g++) {
      const k = groups[g].indexOf(r);
      if (k >= 0) return [g, k];
    }
    return [-1, -1];
  }
  function take(r) {
    const [g, k] = where(r);
    groups[g].splice(k, 1);
    if (groups[g].length === 0) groups.splice(g, 1);
  }

  // ---- ordering: the list is the order, best first ----
  function moveUp(r) {
    const [g, k] = where(r);
    if (groups[g].length > 1) { groups[g].splice(k, 1); groups.splice(g, 0, [r]); }
    else if (g > 0) { [groups[g - 1], groups[g]] = [groups[g], groups[g - 1]]; }
    render();
  }
  function moveDown(r) {
    const [g, k] = where(r);
    if (groups[g].length > 1) { groups[g].splice(k, 1); groups.splice(g + 1, 0, [r]); }
    else if (g < groups.length - 1) { [groups[g], groups[g + 1]] = [groups[g + 1], groups[g]]; }
    render();
  }
  function toggleTie(r) {
    const [g, k] = where(r);
    if (groups[g].length > 1) {
      groups[g].splice(k, 1);
      groups.splice(k === 0 ? g : g + 1, 0, [r]);
    } else if (g > 0) {
      groups[g - 1].push(r);
      groups.splice(g, 1);
    }
    render();
  }
  function dropOn(r, target, after) {
    if (r === target) return;
    take(r);
    const [tg] = where(target);
    groups.splice(after ? tg + 1 : tg, 0, [r]);
    render();
  }
  function toggleFlag(r, flag) {
    if (flags[r].has(flag)) flags[r].delete(flag); else flags[r].add(flag);
    render();
  }
  function displayOrder() { return groups.flat(); }

  let dragged = null;
  function render() {
    const list = $("responses");
    list.replaceChildren();
    groups.forEach((group, g) => group.forEach((r, k) => {
      const li = el("li", "card");
      li.dataset.response = String(r);
      if (r === selected) li.classList.add("selected");
      if (group.length > 1) li.classList.add("tied");
      if (k > 0) li.classList.add("tied-below");
      li.draggable = true;

      const head = el("div", "card-head");
      head.append(el("span", "rank", (group.length > 1 ? "=" : "") + ordinal(g + 1)));
      head.append(el("span", "label", "Response " + label(r)));
      const controls = el("span", "controls");
      const button = (cls, text, title, fn) => {
        const b = el("button", cls, text);
        b.type = "button";
        b.title = title;
        b.setAttribute("aria-label", title + " (response " + label(r) + ")");
        b.addEventListener("click", (e) => { e.stopPropagation(); selected = r; fn(); });
        return b;
      };
      controls.append(button("up", "▲", "better", () => moveUp(r)));
      controls.append(button("down", "▼", "worse", () => moveDown(r)));
      const tie = button("tie", "=", "tie with the one above", () => toggleTie(r));
      tie.setAttribute("aria-pressed", group.length > 1 ? "true" : "false");
      controls.append(tie);
      head.append(controls);
      li.append(head);

      li.append(el("div", "text response-text", item.responses[r]));

      const row = el("div", "flags");
      for (const [flag, name, key] of FLAGS) {
        const lab = el("label", "flag");
        const box = el("input");
        box.type = "checkbox";
        box.dataset.flag = flag;
        box.checked = flags[r].has(flag);
        box.addEventListener("change", () => { selected = r; toggleFlag(r, flag); });
        lab.append(box, document.createTextNode(" " + name + " "), el("kbd", "", key));
        row.append(lab);
      }
      li.append(row);

      li.addEventListener("click", (e) => {
        if (e.target.closest("button, input, label")) return; // the control's own handler renders
        selected = r;
        render();
      });
      li.addEventListener("dragstart", (e) => { dragged = r; e.dataTransfer.setData("text/plain", String(r)); li.classList.add("dragging"); });
      li.addEventListener("dragend", () => { dragged = null; render(); });
      li.addEventListener("dragover", (e) => {
        e.preventDefault();
        const box = li.getBoundingClientRect();
        const after = e.clientY > box.top + box.height / 2;
        li.classList.toggle("drop-before", !after);
        li.classList.toggle("drop-after", after);
      });
      li.addEventListener("dragleave", () => li.classList.remove("drop-before", "drop-after"));
      li.addEventListener("drop", (e) => {
        e.preventDefault();
        const box = li.getBoundingClientRect();
        if (dragged !== null) dropOn(dragged, r, e.clientY > box.top + box.height / 2);
      });
      list.append(li);
    }));
  }

  function showProgress(p) {
    const share = p.team_needed ? p.team_done / p.team_needed : 0;
    $("fill").style.width = (100 * share).toFixed(1) + "%";
    let text = "you: " + p.mine + " ranked, " + p.open + " to go";
    if (p.skipped) text += ", " + p.skipped + " skipped";
    text += " · team: " + p.team_done + " of " + p.team_needed + " rankings";
    if (p.overlap > 1) text += " (each prompt by " + p.overlap + ")";
    $("progress-text").textContent = text;
  }

  async function load() {
    let res;
    try { res = await api("GET", "/api/next"); }
    catch (_) { say("Cannot reach the server. Reload the page to try again.", "error"); return; }
    const { status, data } = res;
    if (status !== 200) {
      $("task").hidden = true;
      say(data.error || ("The server answered " + status + "."), "error");
      return;
    }
    $("who").textContent = data.labeller;
    const link = $("status-link");
    link.hidden = !data.lead;
    link.href = "/status" + (token ? "#token=" + encodeURIComponent(token) : "");
    showProgress(data.progress);
    if (!data.item) {
      item = null;
      $("task").hidden = true;
      $("done").hidden = false;
      return;
    }
    item = data.item;
    groups = item.responses.map((_, i) => [i]);
    flags = item.responses.map(() => new Set());
    selected = 0;
    $("comment").value = "";
    $("prompt").textContent = item.prompt;
    $("done").hidden = true;
    $("task").hidden = false;
    shownAt = performance.now();
    render();
  }

  async function send(path, body, done) {
    if (busy || !item) return;
    busy = true;
    let res;
    try { res = await api("POST", path, body); }
    catch (_) {
      busy = false;
      say("Cannot reach the server: nothing was saved. Try again.", "error");
      return;
    }
    busy = false;
    const { status, data } = res;
    if (status === 200) { say(done); await load(); }
    else if (status === 409) { say(data.error, "warn"); await load(); }
    else say(data.error || ("The server answered " + status + "."), "error");
  }

  function submit() {
    if (!item) return;
    const seconds = Math.round((performance.now() - shownAt) / 100) / 10;
    send("/api/answer", {
      id: item.id,
      order: groups.map((g) => g.slice()),
      flags: item.responses.map((_, i) => FLAGS.map((f) => f[0]).filter((f) => flags[i].has(f))),
      comment: $("comment").value,
      seconds,
    }, "Saved.");
  }
  function skip() {
    if (item) send("/api/skip", { id: item.id }, "Skipped: it goes to someone else.");
  }

  document.addEventListener("keydown", (e) => {
    const inComment = e.target === $("comment");
    if (inComment) {
      if (e.key === "Escape") $("comment").blur();
      else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); }
      return;
    }
    if (e.target.tagName === "BUTTON" && (e.key === "Enter" || e.key === " ")) return; // the button's own action
    if (!item || e.ctrlKey || e.metaKey || e.altKey) return;
    const order = displayOrder();
    const at = order.indexOf(selected);
    const key = e.key;
    let handled = true;
    if ((key === "ArrowDown" && e.shiftKey) || key === "J") moveDown(selected);
    else if ((key === "ArrowUp" && e.shiftKey) || key === "K") moveUp(selected);
    else if (key === "ArrowDown" || key === "j") { selected = order[Math.min(at + 1, order.length - 1)]; render(); }
    else if (key === "ArrowUp" || key === "k") { selected = order[Math.max(at - 1, 0)]; render(); }
    else if (key === "=" || key === "t") toggleTie(selected);
    else if (key === "h" || key === "u" || key === "o") toggleFlag(selected, FLAGS.find((f) => f[2] === key)[0]);
    else if (key === "c") $("comment").focus();
    else if (key === "Enter") submit();
    else if (key === "s") skip();
    else if (key === "?") $("keys").open = !$("keys").open;
    else handled = false;
    if (handled) e.preventDefault();
  });
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  window.addEventListener("hashchange", () => location.reload());
  load();
})();
