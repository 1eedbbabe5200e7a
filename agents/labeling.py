"""`textenv label`: people rank a policy's responses in the browser, and the rankings become comparison data.

The H in RLHF: InstructGPT's labelers ranked 4-9 responses per prompt. This samples K responses to each of
`num_prompts` prompts from a policy (the queue, once), then serves a page (Starlette under uvicorn) where each
labeler orders them best to worst (ties allowed) or skips a prompt. Every ranking is appended to
RUN/labels/rankings.jsonl in the ranked layout the simulated annotator writes (plus "tiers", "labeler", "time"),
so `textenv rm --data RUN/labels/rankings.jsonl` trains on people alone, and `--data RUN/comparisons
RUN/labels/rankings.jsonl` on both.

Safety: the page binds to 127.0.0.1 unless told otherwise, and any other host needs `--token` (every request then
carries it); model text reaches the page only as JSON and is set with `textContent`, under a Content-Security-Policy
that allows no inline script; writes are atomic and serialised (`agents.label_store`); a bad request gets a 4xx
naming what is wrong.

    textenv label --run runs/default                      # http://127.0.0.1:8000
    textenv label --run runs/default --host 0.0.0.0 --token "$(openssl rand -hex 16)"
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import random
from dataclasses import dataclass
from pathlib import Path

from agents.label_store import LabelStore, Rejected, agreement, check_labeler, write_atomic
from textenv.chat import check_prompt_format
from textenv.models.tokens import check_temperature

PAGE = Path(__file__).with_name("label_page.html")
SCRIPT = Path(__file__).with_name("label_page.js")


@dataclass
class LabelConfig:
    run: str = "runs/default"
    """The main job's run folder: the policy is RUN/sft/model and the labels go to RUN/labels unless `policy` or
    `out_dir` say otherwise."""
    out_dir: str | None = None
    """Labels folder: queue.jsonl (the K responses per prompt), rankings.jsonl, skips.jsonl. Default: RUN/labels."""
    policy: str | None = None
    """Causal LM folder or hub id whose responses people rank. Default: RUN/sft/model."""
    task: str = "sentiment"
    """Embedded task whose train prompts are ranked; its gold scores are kept beside each ranking (the page's
    labeler-gold agreement), never shown."""
    prompts: str | None = None
    """Other prompts (a .jsonl/.csv/.parquet/.txt file) instead of the task's train prompts."""
    num_prompts: int = 64
    """Prompts in the queue (the first n of `prompts`, or of the task's train prompts for `seed`)."""
    k: int = 4
    """Responses per prompt (InstructGPT: 4 to 9)."""
    temperature: float = 1.0
    """Policy sampling temperature."""
    prompts_per_batch: int = 16
    """Prompts per sampling rollout."""
    prompt_format: str = "auto"
    """How a str prompt reaches the policy: "chat", "text" or "auto" (as in every stage)."""
    seed: int = 0
    """Seeds the prompts, the sampling and each labeler's display order."""
    device: str | None = None
    """torch device for sampling; default: cuda if available, else cpu."""
    host: str = "127.0.0.1"
    """Interface to serve on. Anything but a loopback address needs `token`."""
    port: int = 8000
    """TCP port."""
    token: str | None = None
    """Access token every request must carry (`?token=` in the page's address, then a header); required to serve
    beyond localhost."""

    def __post_init__(self):
        check_prompt_format(self.prompt_format)
        check_temperature(self.temperature)
        if self.num_prompts < 1 or self.prompts_per_batch < 1 or self.k < 2:
            raise ValueError(f"num_prompts and prompts_per_batch must be >= 1 and k >= 2, got {self.num_prompts}, "
                             f"{self.prompts_per_batch} and {self.k}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("token must be at least 8 characters (e.g. `openssl rand -hex 16`)")
        if not is_loopback(self.host) and self.token is None:
            raise ValueError(f"host {self.host!r} serves the page to other machines: pass --token SECRET as well "
                             "(labelers then open http://HOST:PORT/?token=SECRET), or keep --host 127.0.0.1")

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path(self.run) / "labels"


QUEUE_FIELDS = ("policy", "task", "prompts", "num_prompts", "k", "temperature", "prompt_format", "seed")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_queue(cfg: LabelConfig) -> LabelStore:
    """The labels folder's queue: sampled once; a rerun with the same settings reuses it (and the rankings), one
    with other settings is refused, since the rankings there belong to that queue."""
    from agents.episodes import episode_prompts
    from agents.preferences import sample_responses

    folder = cfg.folder
    policy = cfg.policy or str(Path(cfg.run) / "sft" / "model")
    settings = {**{k: getattr(cfg, k) for k in QUEUE_FIELDS}, "policy": policy}
    settings_file = folder / "queue_config.json"
    if settings_file.exists():
        old = json.loads(settings_file.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{folder} holds a queue sampled with other settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); its rankings "
                             "belong to that queue: use another --out-dir")
        return LabelStore(folder)
    if not Path(policy).exists():
        raise ValueError(f"policy {policy!r} does not exist: run the main job first (`textenv pipeline`), or pass "
                         "--policy")
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.prompts is not None:
        from textenv.prompts import load_prompts

        prompts = load_prompts(cfg.prompts)[: cfg.num_prompts]
    else:
        prompts = episode_prompts(cfg.task, "train", cfg.num_prompts, cfg.seed)
    samples = sample_responses(policy, cfg.task, prompts, cfg.k, cfg.prompts_per_batch, cfg.temperature, cfg.seed,
                               cfg.device, cfg.prompt_format)
    rows = [{"id": i, "prompt": prompt, "responses": responses, "gold": gold}
            for i, (prompt, responses, gold) in enumerate(samples)]
    write_atomic(folder / "queue.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(settings_file, json.dumps(settings, indent=1))  # last: a queue without it is resampled
    return LabelStore(folder)


def display_order(labeler: str, prompt_id: int, k: int, seed: int) -> list[int]:
    """Each labeler sees a prompt's responses in an order of its own (no position bias shared by everyone), the
    same order on every reload."""
    order = list(range(k))
    random.Random(f"{seed}/{labeler}/{prompt_id}").shuffle(order)
    return order


# ---- the web app ----

def make_app(store: LabelStore, token: str | None = None, seed: int = 0):
    """The Starlette app over `store`. With `token`, every request must carry it (header `X-Label-Token`, or
    `?token=` for the page itself); without, only loopback clients are served."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    class Guard(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next):
            if token is not None:
                given = request.headers.get("x-label-token") or request.query_params.get("token") or ""
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return error(401, "missing or wrong access token: open the address with ?token=...")
            elif not (request.client and is_loopback(request.client.host)):
                return error(403, "this server takes requests from this machine only (start it with --token to "
                                  "serve other hosts)")
            response = await call_next(request)
            response.headers["Content-Security-Policy"] = ("default-src 'none'; script-src 'self'; style-src 'self' "
                                                           "'unsafe-inline'; connect-src 'self'; img-src 'self'")
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

    def page(request: Request) -> Response:
        return Response(PAGE.read_text(encoding="utf-8"), media_type="text/html; charset=utf-8")

    def script(request: Request) -> Response:
        return Response(SCRIPT.read_text(encoding="utf-8"), media_type="text/javascript; charset=utf-8")

    def stats_of(labeler: str | None) -> dict:
        out = agreement(store.rankings())
        out["total_prompts"] = len(store.queue)
        if labeler is not None:
            out["progress"] = store.progress(labeler)
        return out

    def next_item(request: Request) -> JSONResponse:
        try:
            labeler = check_labeler(request.query_params.get("labeler"))
        except Rejected as e:
            return error(e.status, str(e))
        item = store.next_for(labeler)
        body = {"progress": store.progress(labeler), "stats": stats_of(None)}
        if item is None:
            return JSONResponse({**body, "done": True})
        order = display_order(labeler, item["id"], len(item["responses"]), seed)
        return JSONResponse({**body, "done": False, "prompt_id": item["id"], "prompt": item["prompt"],
                             "responses": [{"index": j, "text": item["responses"][j]} for j in order]})

    async def submit(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"the body is not JSON: {e}")
        try:
            progress = await run_in_threadpool(store.submit, body)  # it waits on the file lock
        except Rejected as e:
            return error(e.status, str(e))
        return JSONResponse({"ok": True, "progress": progress})

    def stats(request: Request) -> JSONResponse:
        labeler = request.query_params.get("labeler")
        try:
            return JSONResponse(stats_of(check_labeler(labeler) if labeler is not None else None))
        except Rejected as e:
            return error(e.status, str(e))

    routes = [Route("/", page), Route("/label.js", script), Route("/api/next", next_item),
              Route("/api/submit", submit, methods=["POST"]), Route("/api/stats", stats)]
    return Starlette(routes=routes, middleware=[Middleware(Guard)])


def label(cfg: LabelConfig) -> None:
    """Sample (or reuse) the queue, then serve the page until interrupted."""
    import uvicorn

    store = build_queue(cfg)
    done = agreement(store.rankings())["labelers"]
    where = f"http://{cfg.host}:{cfg.port}/" + (f"?token={cfg.token}" if cfg.token else "")
    print(f"label: {len(store.queue)} prompts x {cfg.k} responses in {store.folder}; rankings so far "
          f"{sum(done.values())} by {len(done)} labeler(s). Open {where}  (Ctrl-C stops; nothing is lost)")
    uvicorn.run(make_app(store, cfg.token, cfg.seed), host=cfg.host, port=cfg.port, log_level="warning")



