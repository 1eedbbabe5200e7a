"""`textenv label`: people's rankings through the API (validation, concurrency, crashes, access), ties in the ranked
layout, agreement figures, a reward model trained on people's and simulated rankings, and a real headless
Chromium ranking three prompts."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from agents.core import ranking_pairs
from agents.label_store import LabelStore, agreement, write_atomic
from agents.labeling import LabelConfig, build_queue, display_order, make_app
from agents.preferences import load_preferences

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & <b>bold</b>'
LOCAL = ("127.0.0.1", 50000)


def make_queue(folder: Path, n: int = 3, k: int = 3) -> LabelStore:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "prompt": f"prompt {i}:", "responses": [f" answer {i}.{j}" for j in range(k)],
             "gold": [float(j) for j in range(k)]} for i in range(n)]
    rows[0]["responses"][1] = SCRIPT
    write_atomic(folder / "queue.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return LabelStore(folder)


@pytest.fixture
def store(tmp_path):
    return make_queue(tmp_path / "labels")


def client(store, token=None, host=LOCAL):
    return TestClient(make_app(store, token), client=host)


# ---------------------------------------------------------------- the API

def test_rank_skip_and_progress(store):
    c = client(store)
    first = c.get("/api/next", params={"labeler": "ann"}).json()
    assert first["prompt_id"] == 0 and first["prompt"] == "prompt 0:" and not first["done"]
    assert [r["index"] for r in first["responses"]] == display_order("ann", 0, 3, 0)  # her own stable order
    assert {r["text"] for r in first["responses"]} == {" answer 0.0", SCRIPT, " answer 0.2"}
    assert c.post("/api/submit", json={"labeler": "ann", "prompt_id": 0, "ranking": [[2], [0, 1]]}).status_code == 200
    row = store.rankings()[0]
    assert row["ranking"] == [2, 0, 1] and row["tiers"] == [0, 1, 1] and row["labeler"] == "ann"
    assert row["responses"][1] == SCRIPT and row["gold"] == [0.0, 1.0, 2.0] and row["time"] > 0
    assert c.get("/api/next", params={"labeler": "ann"}).json()["prompt_id"] == 1
    assert c.post("/api/submit", json={"labeler": "ann", "prompt_id": 1, "skip": True}).status_code == 200
    nxt = c.get("/api/next", params={"labeler": "ann"}).json()
    assert nxt["prompt_id"] == 2 and nxt["progress"] == {"ranked": 1, "skipped": 1, "total": 3}
    assert c.get("/api/next", params={"labeler": "bob"}).json()["prompt_id"] == 0  # another labeler starts over
    # the file is a comparisons data set: the tie makes no pair
    prefs = load_preferences(store.folder / "rankings.jsonl")
    assert prefs.layout == "ranked" and prefs.rows[0]["tiers"] == [0, 1, 1]
    winners, losers, _ = ranking_pairs([r["ranking"] for r in prefs.rows], [r["tiers"] for r in prefs.rows])
    assert sorted(zip(winners.tolist(), losers.tolist())) == [(0, 1), (0, 2)]  # response 2 beat 0 and 1


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
    ({"prompt_id": 0, "ranking": [[0], [1, 2]]}, 400, "labeler must be"),
    ({"labeler": "<ann>", "prompt_id": 0, "ranking": [[0], [1, 2]]}, 400, "labeler must be"),
    ({"labeler": "ann", "prompt_id": "0", "ranking": [[0], [1, 2]]}, 400, "prompt_id must be an integer"),
    ({"labeler": "ann", "prompt_id": 7, "ranking": [[0], [1, 2]]}, 404, "prompt_id 7 is not in the queue"),
    ({"labeler": "ann", "prompt_id": 0, "ranking": [[0], [1, 1]]}, 422, "exactly once"),
    ({"labeler": "ann", "prompt_id": 0, "ranking": [[0], [1, 3]]}, 422, "exactly once"),
    ({"labeler": "ann", "prompt_id": 0, "ranking": [[0], [1]]}, 422, "exactly once"),
    ({"labeler": "ann", "prompt_id": 0, "ranking": [[0, 1, 2]]}, 422, "every response is tied"),
    ({"labeler": "ann", "prompt_id": 0, "ranking": [[0], []]}, 422, "non-empty lists"),
    ({"labeler": "ann", "prompt_id": 0, "ranking": [[True], [1, 2]]}, 422, "exactly once"),
    ({"labeler": "ann", "prompt_id": 0}, 400, "either a ranking or"),
    ({"labeler": "ann", "prompt_id": 0, "skip": True, "ranking": [[0], [1, 2]]}, 400, "either a ranking or"),
])
def test_a_bad_submission_gets_a_4xx_with_its_reason_and_changes_nothing(store, body, status, message):
    c = client(store)
    response = (c.post("/api/submit", content=body) if isinstance(body, bytes) else c.post("/api/submit", json=body))
    assert response.status_code == status and message in response.json()["error"], response.json()
    assert not (store.folder / "rankings.jsonl").exists() and not (store.folder / "skips.jsonl").exists()
    assert c.get("/api/next", params={"labeler": "x y"}).status_code == 400


def test_a_second_submission_of_one_prompt_is_refused(store):
    c = client(store)
    ok = {"labeler": "ann", "prompt_id": 0, "ranking": [[0], [1], [2]]}
    assert c.post("/api/submit", json=ok).status_code == 200
    again = c.post("/api/submit", json={**ok, "ranking": [[2], [1], [0]]})
    assert again.status_code == 409 and "already ranked" in again.json()["error"]
    assert c.post("/api/submit", json={"labeler": "ann", "prompt_id": 0, "skip": True}).status_code == 409
    assert len(store.rankings()) == 1 and store.rankings()[0]["ranking"] == [0, 1, 2]


def _submit_all(folder: str, labeler: str, n: int) -> None:  # a process of its own
    store = LabelStore(folder)
    for i in range(n):
        store.submit({"labeler": labeler, "prompt_id": i, "ranking": [[i % 3], [(i + 1) % 3, (i + 2) % 3]]})


def test_two_labelers_at_once_lose_nothing_and_duplicate_nothing(tmp_path):
    """Two processes (each a labeler) and, within this one, eight threads racing on the same submissions."""
    store = make_queue(tmp_path / "labels", n=40)
    ctx = multiprocessing.get_context("fork")  # the children only write files: no torch, no threads of ours
    procs = [ctx.Process(target=_submit_all, args=(str(store.folder), name, 40)) for name in ("ann", "bob")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    outcomes = []

    def race(i):
        try:
            store.submit({"labeler": "cat", "prompt_id": i % 10, "ranking": [[0], [1], [2]]})
            outcomes.append("ok")
        except ValueError as e:
            outcomes.append(getattr(e, "status", None))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(40)]  # each of 10 prompts four times
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 10 and outcomes.count(409) == 30
    rows = store.rankings()
    keys = [(r["labeler"], r["prompt_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 90
    assert {k for k in keys if k[0] != "cat"} == {(name, i) for name in ("ann", "bob") for i in range(40)}


SERVER = """
import sys
import uvicorn
from agents.label_store import LabelStore
from agents.labeling import make_app
uvicorn.run(make_app(LabelStore(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_killed_mid_write_leaves_a_readable_dataset(tmp_path):
    """A real server process takes submissions from four threads until it is SIGKILLed among them."""
    import httpx

    store = make_queue(tmp_path / "labels", n=5000)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(store.folder), str(port)], cwd=ROOT)
    url, stop, acknowledged = f"http://127.0.0.1:{port}", threading.Event(), []
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(url + "/api/stats", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)

    def post(labeler):
        with httpx.Client(base_url=url, timeout=5) as c:
            for i in range(5000):
                if stop.is_set():
                    return
                try:
                    r = c.post("/api/submit", json={"labeler": labeler, "prompt_id": i, "ranking": [[0], [1], [2]]})
                except httpx.TransportError:  # the server is gone
                    return
                if r.status_code == 200:
                    acknowledged.append((labeler, i))

    threads = [threading.Thread(target=post, args=(f"l{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    while len(store.rankings()) < 300 and time.time() < deadline:  # files of ~100 KB by then, rewritten each time
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    rows = store.rankings()  # every line parses: nothing half written
    assert len(rows) >= 300
    keys = [(r["labeler"], r["prompt_id"]) for r in rows]
    assert len(set(keys)) == len(keys) and set(acknowledged) <= set(keys)  # every acknowledged ranking is there
    assert len(load_preferences(store.folder / "rankings.jsonl").rows) == len(rows)
    store.submit({"labeler": "ann", "prompt_id": 0, "ranking": [[0], [1], [2]]})  # and it goes on
    assert len(store.rankings()) == len(rows) + 1


def test_the_label_command_samples_its_queue_and_serves(tiny_run, tmp_path):
    """`textenv label` as the README runs it: the queue is sampled, the page served on 127.0.0.1, Ctrl-C stops."""
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "label", "--run", str(tiny_run), "--out-dir",
                             str(tmp_path / "labels"), "--num-prompts", "3", "--k", "3", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert f"Open http://127.0.0.1:{port}/" in line and "3 prompts x 3 responses" in line, line
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert page.status_code == 200 and "Rank the responses" in page.text
        item = httpx.get(f"http://127.0.0.1:{port}/api/next", params={"labeler": "ann"}).json()
        assert item["prompt_id"] == 0 and len(item["responses"]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert len(LabelStore(tmp_path / "labels").queue) == 3


def test_other_hosts_need_the_token(store):
    assert client(store, host=("10.1.2.3", 4000)).get("/").status_code == 403  # no token: this machine only
    assert client(store).get("/").status_code == 200
    remote = client(store, token="s3cret-token", host=("10.1.2.3", 4000))
    assert remote.get("/").status_code == 401 and remote.get("/api/next?labeler=a").status_code == 401
    assert remote.get("/api/next?labeler=a", headers={"X-Label-Token": "wrong-token"}).status_code == 401
    assert remote.get("/?token=s3cret-token").status_code == 200
    assert remote.get("/api/next?labeler=a", headers={"X-Label-Token": "s3cret-token"}).status_code == 200
    assert remote.post("/api/submit", json={"labeler": "a", "prompt_id": 0, "skip": True}).status_code == 401
    assert not (store.folder / "skips.jsonl").exists()
    with pytest.raises(ValueError, match="--token"):
        LabelConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="at least 8"):
        LabelConfig(host="0.0.0.0", token="short")
    assert LabelConfig(host="0.0.0.0", token="s3cret-token").token == "s3cret-token"
    for bad, message in ((dict(k=1), "k >= 2"), (dict(port=0), "port"), (dict(prompt_format="html"), "html"),
                         (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=message):
            LabelConfig(**bad)


def test_model_text_never_reaches_the_page_as_html(store):
    c = client(store)
    page = c.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script may run
    assert "answer" not in page.text and "answer" not in c.get("/label.js").text  # text comes as JSON only
    script = c.get("/label.js").text
    assert "innerHTML" not in script and "textContent" in script


def test_agreement_by_hand():
    # ann and bob rank prompt 0's three responses: ann 2 > 1 > 0, bob 2 > (0 = 1). Pairs both order strictly:
    # (0,2) and (1,2), alike in both: 2/2. Gold 0 < 1 < 2: ann agrees on all 3 pairs, bob on his 2.
    three = {"responses": ["r0", "r1", "r2"], "gold": [0, 1, 2]}
    rows = [{"prompt_id": 0, "labeler": "ann", "ranking": [2, 1, 0], "tiers": [0, 1, 2], **three},
            {"prompt_id": 0, "labeler": "bob", "ranking": [2, 0, 1], "tiers": [0, 1, 1], **three},
            {"prompt_id": 1, "labeler": "bob", "ranking": [0, 1, 2], "tiers": [0, 1, 2], **three}]
    out = agreement(rows)
    assert out["inter_labeler"] == 1.0 and out["inter_labeler_pairs"] == 2
    assert out["gold"] == {"ann": 1.0, "bob": pytest.approx(2 / 5)}  # bob: 2 of prompt 0's, 0 of prompt 1's 3
    assert out["labelers"] == {"ann": 1, "bob": 2}
    rows[1]["ranking"] = [0, 2, 1]  # bob now 0 > (2 = 1): (0,1) and (0,2) are strict in both, and both disagree
    assert agreement(rows)["inter_labeler"] == 0.0 and agreement(rows)["inter_labeler_pairs"] == 2
    assert agreement(rows[2:])["inter_labeler"] is None
    # a reader's merged, reordered copy of bob's row (responses best first) gives the same figures: texts are keys
    reordered = {**rows[1], "responses": ["r0", "r2", "r1"], "ranking": [0, 1, 2], "tiers": [0, 1, 1],
                 "gold": [0, 2, 1]}
    assert agreement([rows[0], reordered, rows[2]]) == agreement(rows)


# ---------------------------------------------------------------- the queue, and a reward model on people's labels

def test_queue_sampled_once_then_reused_and_a_changed_one_refused(tiny_run, tmp_path):
    cfg = LabelConfig(run=str(tiny_run), out_dir=str(tmp_path / "labels"), num_prompts=6, k=3)
    store = build_queue(cfg)
    assert len(store.queue) == 6 and all(len(r["responses"]) == 3 and len(r["gold"]) == 3 for r in store.queue)
    before = (tmp_path / "labels" / "queue.jsonl").read_bytes()
    assert build_queue(cfg).queue == store.queue and (tmp_path / "labels" / "queue.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="k: 3 -> 4"):
        build_queue(LabelConfig(run=str(tiny_run), out_dir=str(tmp_path / "labels"), num_prompts=6, k=4))
    with pytest.raises(ValueError, match="run the main job first"):
        build_queue(LabelConfig(run=str(tmp_path / "nothing")))


def test_a_reward_model_trains_on_people_alone_and_mixed_and_scores_in_the_env(tiny_run, tmp_path):
    import gymnasium as gym

    from agents.reward_model import RMConfig, train_reward_model
    from textenv.tokenizer import load_tokenizer

    store = build_queue(LabelConfig(run=str(tiny_run), out_dir=str(tmp_path / "labels"), num_prompts=40, k=3))
    c = client(store)
    for row in store.queue:  # through the page's API: a labeler who ranks by the gold, tying equal scores
        levels = sorted(set(row["gold"]), reverse=True)
        tiers = [[j for j, g in enumerate(row["gold"]) if g == level] for level in levels]
        body = {"labeler": "ann", "prompt_id": row["id"]}
        assert c.post("/api/submit", json={**body, "ranking": tiers} if len(tiers) > 1 else {**body, "skip": True}
                      ).status_code == 200
    people = tmp_path / "labels" / "rankings.jsonl"
    common = dict(model=str(tiny_run / "sft" / "model"), batch_size=4, n_eval_samples=8, n_reference=32)
    alone = train_reward_model(RMConfig(data=str(people), out_dir=str(tmp_path / "rm_people"), **common))
    mixed = train_reward_model(RMConfig(data=[str(tiny_run / "comparisons"), str(people)],
                                        out_dir=str(tmp_path / "rm_mixed"), **common))
    summary = json.loads((tmp_path / "rm_mixed" / "summary.json").read_text())
    assert summary["layout"] == "ranked" and summary["source_rows"] == 32 + len(store.rankings())
    assert summary["labelers"]["labelers"] == {"ann": len(store.rankings())}
    assert summary["labelers"]["gold"] == {"ann": 1.0}  # she ranked by the gold
    for rm in (alone, mixed):
        env = gym.make("textenv/PositiveReview-v0", tokenizer=str(tiny_run / "sft" / "model"), reward_fn=str(rm),
                       max_new_tokens=4).unwrapped
        env.reset(seed=0)
        _, reward, terminated, _, _ = env.step(load_tokenizer(str(tiny_run / "sft" / "model")).eos_token_id)
        assert terminated and math.isfinite(reward) and reward != 0.0  # the RM's score of the ended episode


# ---------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
browser = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                             reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture
def served(store):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@browser
def test_a_labeler_ranks_three_prompts_in_chromium_and_finds_her_progress_after_a_reload(store, served):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    wait = WebDriverWait(driver, 20)
    try:
        driver.get(served)
        driver.find_element(By.ID, "name").send_keys("ann")
        driver.find_element(By.ID, "start").click()
        expected = []
        for prompt_id in range(3):
            wait.until(lambda d, p=prompt_id: d.find_element(By.ID, "prompt").text == f"prompt {p}:")
            cards = driver.find_elements(By.CSS_SELECTOR, ".card")
            shown = [int(c.get_attribute("data-index")) for c in cards]
            assert len(shown) == 3
            if prompt_id == 0:  # the <script> response is there, as text, and nothing of it ran
                texts = [c.find_element(By.CSS_SELECTOR, ".text").text for c in cards]
                assert SCRIPT in texts
                assert driver.execute_script("return window.pwned === undefined")
                if os.environ.get("TEXTENV_SCREENSHOT"):  # the README's picture
                    cards[2].click()
                    driver.save_screenshot(os.environ["TEXTENV_SCREENSHOT"])
                    driver.find_element(By.ID, "reset").click()
                    cards = driver.find_elements(By.CSS_SELECTOR, ".card")  # drawn anew
            # a click on the last card shown, then the first by its number key (prompt 1: "T" first, a tie);
            # the one left goes last by itself
            cards[2].click()
            body = driver.find_element(By.TAG_NAME, "body")
            if prompt_id == 1:
                body.send_keys("t", "1")
                expected.append([[shown[2], shown[0]], [shown[1]]])
            else:
                body.send_keys("1")
                expected.append([[shown[2]], [shown[0]], [shown[1]]])
            body.send_keys("\n")  # Enter submits
            wait.until(lambda d, n=prompt_id + 1: f"{n} ranked" in d.find_element(By.ID, "progress").text)
        driver.refresh()
        wait.until(lambda d: "3 ranked, 0 skipped of 3" in d.find_element(By.ID, "progress").text)
        assert driver.find_element(By.ID, "finished").is_displayed()
    finally:
        driver.quit()
    rows = store.rankings()
    assert [(r["labeler"], r["prompt_id"]) for r in rows] == [("ann", 0), ("ann", 1), ("ann", 2)]
    for row, tiers in zip(rows, expected):
        assert row["ranking"] == [i for tier in tiers for i in sorted(tier)]
        assert row["tiers"] == [n for n, tier in enumerate(tiers) for _ in tier]
