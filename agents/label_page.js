// textenv label: every model text goes in with textContent, never as HTML.
"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token") || sessionStorage.getItem("label-token") || "";
if (params.get("token")) sessionStorage.setItem("label-token", params.get("token"));
const $ = (id) => document.getElementById(id);
let labeler = localStorage.getItem("labeler") || "";
let item = null;      // {prompt_id, prompt, responses: [{index, text}]}
let tiers = [];       // [[response index, ...], ...] best first
let tieNext = false;

async function api(path, body) {
  const init = {headers: {"X-Label-Token": token}};
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showProgress(p, stats) {
  $("progress").textContent = `${p.ranked} ranked, ${p.skipped} skipped of ${p.total}`;
  if (stats) {
    const inter = stats.inter_labeler === null ? "n/a" : (100 * stats.inter_labeler).toFixed(0) + "%";
    const gold = stats.gold[labeler];
    $("stats").textContent = `Labelers: ${Object.keys(stats.labelers).length}. Agreement between labelers: ${inter}` +
      ` (${stats.inter_labeler_pairs} pairs).` + (gold === undefined ? "" :
      ` Your agreement with the task's gold scorer: ${(100 * gold).toFixed(0)}%.`);
  }
}

function placeOf(index) {
  for (let t = 0; t < tiers.length; t++) if (tiers[t].includes(index)) return t;
  return -1;
}

function render() {
  const box = $("responses");
  box.replaceChildren();
  item.responses.forEach((r, n) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.index = r.index;
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = String(n + 1);
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = r.text;
    const rank = document.createElement("span");
    rank.className = "rank";
    const t = placeOf(r.index);
    if (t >= 0) {
      card.classList.add("placed");
      rank.textContent = `#${t + 1}` + (tiers[t].length > 1 ? " (tie)" : "");
    }
    card.append(key, text, rank);
    card.addEventListener("click", (e) => choose(r.index, e.shiftKey));
    box.append(card);
  });
}

function choose(index, tie) {
  if (placeOf(index) >= 0) return;
  if ((tie || tieNext) && tiers.length) tiers[tiers.length - 1].push(index);
  else tiers.push([index]);
  tieNext = false;
  const left = item.responses.filter((r) => placeOf(r.index) < 0);
  if (left.length === 1) tiers.push([left[0].index]);  // the last one goes last
  render();
}

async function load() {
  $("message").textContent = "";
  const data = await api(`/api/next?labeler=${encodeURIComponent(labeler)}`);
  showProgress(data.progress, data.stats);
  if (data.done) {
    $("task").hidden = true;
    $("finished").hidden = false;
    return;
  }
  item = data;
  tiers = [];
  $("prompt").textContent = item.prompt;
  $("task").hidden = false;
  render();
}

async function send(body) {
  try {
    await api("/api/submit", {labeler, prompt_id: item.prompt_id, ...body});
    await load();
  } catch (e) {
    $("message").textContent = e.message;
  }
}

function submit() {
  if (item.responses.some((r) => placeOf(r.index) < 0)) {
    $("message").textContent = "Place every response first (or skip).";
    return;
  }
  send({ranking: tiers});
}

function start() {
  labeler = $("name").value.trim();
  if (!/^[A-Za-z0-9_.@-]{1,64}$/.test(labeler)) {
    $("name").setCustomValidity("letters, digits and _.@- only");
    $("name").reportValidity();
    return;
  }
  localStorage.setItem("labeler", labeler);
  $("who").textContent = labeler;
  $("name").blur();  // the keys are the page's now
  $("login").hidden = true;
  load().catch((e) => { $("message").textContent = e.message; $("task").hidden = false; });
}

$("start").addEventListener("click", start);
$("name").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
$("submit").addEventListener("click", submit);
$("undo").addEventListener("click", () => { if (tiers.length) { tiers[tiers.length - 1].pop();
  if (!tiers[tiers.length - 1].length) tiers.pop(); render(); } });
$("reset").addEventListener("click", () => { tiers = []; render(); });
$("skip").addEventListener("click", () => send({skip: true}));
document.addEventListener("keydown", (e) => {
  if (!item || $("task").hidden || e.target.tagName === "INPUT") return;
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= item.responses.length) choose(item.responses[n - 1].index, e.shiftKey);
  else if (e.key === "t" || e.key === "T") tieNext = true;
  else if (e.key === "Enter") submit();
  else if (e.key === "u" || e.key === "U" || e.key === "Backspace") $("undo").click();
  else if (e.key === "r" || e.key === "R") $("reset").click();
  else if (e.key === "s" || e.key === "S") $("skip").click();
});
if (labeler) { $("name").value = labeler; start(); }
