"""The Gradio demo. It talks to the HTTP API only (never to engines), so the same page runs mounted
at /ui inside `flowmap serve` or alone against any server with `flowmap demo --url URL`.

It holds no privilege of its own: mounted on a server with API keys, it asks the visitor for a key
(a password box, or the Authorization header of a Gradio API call) and forwards it, so /ui lets in
exactly whom /v1 lets in."""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import time

import gradio as gr
import httpx
import numpy as np
from PIL import Image, ImageOps

from ui.temp_files import DEFAULT_CACHE_SECONDS, deleting_temp_files

DISPLAY_SIZE = 128  # pixels a side in the gallery; the API upscales by nearest neighbour
CSS = ".pixelated img { image-rendering: pixelated; }"


class ApiClient:
    """A thin synchronous client of the flowmap HTTP API (Gradio runs handlers in worker threads)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0):
        self.api_key = api_key  # the standalone demo's own key (`flowmap demo --api-key`), if any
        # a server on this machine (the mounted demo calls its own) is never reached through HTTP(S)_PROXY
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, trust_env=not loopback(url))

    def _headers(self, api_key: str | None) -> dict:
        key = api_key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, body: dict, api_key: str | None = None) -> dict:
        response = self.http.post(path, json=body, headers=self._headers(api_key))
        if response.status_code != 200:
            raise gr.Error(error_message(response), print_exception=False)  # the visitor's error, not ours
        return response.json()

    def models(self) -> dict:
        response = self.http.get("/v1/models", headers=self._headers(None))
        if response.status_code != 200:
            raise gr.Error(error_message(response))
        return {m["kind"]: m for m in response.json()["data"]}


def loopback(url: str) -> bool:
    """Whether `url` names this machine: localhost, 127.0.0.0/8 or ::1."""
    host = httpx.URL(url).host
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def error_message(response: httpx.Response) -> str:
    """The API's own message for a failed call, as a sentence a person can act on."""
    try:
        return f"{response.json()['error']['message']} (HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        return f"the server answered HTTP {response.status_code}"


def quiet(component):
    """`component`, whose rejected input (a value outside a slider's range, a choice not offered, a seed that is
    no number: NaN or infinity from an API call; a fraction on a slider of whole steps, which would be cut short)
    becomes a message for the visitor instead of a traceback in the server's log."""
    checked = component.preprocess
    whole = isinstance(component, gr.Slider) and float(component.step).is_integer()

    def preprocess(payload):
        if whole and isinstance(payload, float) and not payload.is_integer():
            raise gr.Error(f"{component.label}: {payload!r} is not a whole number", print_exception=False)
        try:
            return checked(payload)
        except gr.Error as err:
            raise gr.Error(err.message, print_exception=False) from None
        except (ValueError, OverflowError):  # rounding NaN or infinity to a whole number
            raise gr.Error(f"{component.label}: {payload!r} is not a number it takes", print_exception=False) from None

    component.preprocess = preprocess
    return component


def visitor_key(typed: str | None, request: gr.Request | None) -> str | None:
    """The visitor's API key: typed into the page, or sent as `Authorization: Bearer` with a Gradio API call."""
    if typed and typed.strip():
        return typed.strip()
    header = request.headers.get("authorization", "") if request is not None else ""
    if not header.lower().startswith("bearer "):
        return None
    return header[7:].strip() or None


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def outlined(image: Image.Image, colour: str = "#f5a623", width: int = 6) -> Image.Image:
    return ImageOps.expand(image, border=width, fill=colour)


def prompt_box() -> gr.Textbox:
    return gr.Textbox("a red circle left of a blue square", label="prompt", max_length=4000)


def size_for(model: dict) -> str:
    _, height, width = model["image"]
    scale = max(1, DISPLAY_SIZE // max(height, width))
    return f"{width * scale}x{height * scale}"


def build_demo(urls: str | list[str], api_key: str | None = None, models: dict | None = None,
               asks_for_key: bool = False) -> gr.Blocks:
    """The page, for one server or several (one tab a server's bundle, e.g. digits and shapes side by
    side). `models` ({kind: card} as /v1/models lists them) is fetched from each URL when not given.
    With `asks_for_key` the page shows an API key box and forwards the visitor's key with each call.
    Whoever runs it deletes the images Gradio keeps on disk for the page (`deleting_temp_files`)."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    clients = [ApiClient(url, api_key) for url in urls]
    cards = [models] if models and len(urls) == 1 else [client.models() for client in clients]
    with gr.Blocks(title="flowmap-serve demo") as demo:
        if len(urls) == 1:
            gr.Markdown(f"# flowmap-serve: `{cards[0]['student']['id']}`\n" + describe(cards[0], urls[0]))
        else:
            gr.Markdown("# flowmap-serve: " + ", ".join(f"`{card['student']['id']}`" for card in cards))
        key_box = gr.Textbox("", label="API key (this server requires one)", type="password", visible=asks_for_key,
                             elem_id="api-key")
        for index, (client, card, url) in enumerate(zip(clients, cards, urls, strict=True)):
            # the first bundle's handlers keep the plain API names (/generate, /search)
            suffix = "" if index == 0 else f"_{card['student']['id']}"
            with gr.Tab(card["student"]["id"]) if len(urls) > 1 else contextlib.nullcontext():
                if len(urls) > 1:
                    gr.Markdown(describe(card, url))
                model_tabs(client, card, key_box, suffix)
    return demo


def describe(models: dict, url: str) -> str:
    student = models["student"]
    scales = ", ".join(f"{s:g}" for s in student["cfg_scales"])
    return (f"One-step {student.get('method') or 'flow-map'} student of a flow-matching teacher, served over HTTP "
            f"from {url}. Guidance scales baked into this bundle: {scales}.")


def model_tabs(client: ApiClient, models: dict, key_box, suffix: str) -> None:
    """The Generate and Best-of-N tabs of one bundle, inside the page being built."""
    student, teacher = models["student"], models["teacher"]
    classes = student["classes"]
    text = student.get("conditioning") == "text"  # a prompt box instead of the class list
    scales = [f"{s:g}" for s in student["cfg_scales"]]
    size = size_for(student)

    def generate(label: str, count: int, seed: float | None, guidance: str, steps: int, typed_key: str = "",
                 request: gr.Request = None):
        key = visitor_key(typed_key, request)
        body = {"prompts" if text else "labels": [label] * int(count), "steps": int(steps),
                "guidance": float(guidance), "size": size}
        if seed is not None and seed >= 0:
            body["seeds"] = [int(seed) + i for i in range(int(count))]
        tick = time.perf_counter()
        result = client.post("/v1/generate", body, key)
        latency_ms = 1000 * (time.perf_counter() - tick)
        gallery = [(decode(png), f"seed {s}") for png, s in zip(result["images"], result["seeds"], strict=True)]
        info = (f"**{len(gallery)} image(s)** of {'prompt' if text else 'class'} `{label}` in {int(steps)} step(s) "
                f"at guidance {guidance}: "
                f"{latency_ms:.1f} ms round trip, {result['timings']['nfe']} network evaluations. "
                f"Seeds: {', '.join(str(s) for s in result['seeds'])}")
        return gallery, info

    def search(label: str, candidates: int, teacher_steps: int, seed: float | None, guidance: str, typed_key: str = "",
               request: gr.Request = None):
        key = visitor_key(typed_key, request)
        count, steps, scale = int(candidates), int(teacher_steps), float(guidance)
        base = int(seed) if seed is not None and seed >= 0 else int(np.random.default_rng().integers(0, 2**31))
        condition = "prompt" if text else "label"
        result = client.post("/v1/search", {condition: label, "n": count, "top_k": 1, "teacher_steps": steps,
                                            "seed": base, "guidance": scale, "size": size}, key)
        chosen = result["chosen_seeds"][0]
        # the student's candidates themselves (search returns only the chosen images)
        seeds = [c["seed"] for c in result["candidates"]]
        shown = client.post("/v1/generate", {"prompts" if text else "labels": [label] * count, "seeds": seeds,
                                             "guidance": scale,
                                             "size": size}, key)["images"]
        ranked = sorted(zip(result["candidates"], shown, strict=True), key=lambda pair: -pair[0]["score"])
        gallery = [(outlined(decode(png)) if c["seed"] == chosen else decode(png),
                    f"{'★ chosen, ' if c['seed'] == chosen else ''}seed {c['seed']}: "
                    f"{'score' if text else 'log p'} = {c['score']:.4g}")
                   for c, png in ranked]
        stages = {stage["stage"]: stage for stage in result["stages"]}
        measure = "score" if text else "log p"
        report = (f"**Best-of-{count}**: chose seed {chosen} (verifier {measure} = {result['final_scores'][0]:.4g}); "
                  f"{result['total_nfe']} network evaluations in {1000 * result['seconds']:.0f} ms (student "
                  f"{stages['student']['nfe']}, verifier {stages['verifier']['nfe']}"
                  + (f", teacher {stages['teacher']['nfe']}" if "teacher" in stages else "") + ").")
        random_image = None
        if steps > 0:
            random_seed = base + count  # outside the candidates: what the teacher gives without a search
            tick = time.perf_counter()
            baseline = client.post("/v1/generate", {"prompts" if text else "labels": [label], "seeds": [random_seed],
                                                    "steps": steps,
                                                    "model": teacher["id"], "size": size}, key)
            random_image = decode(baseline["images"][0])
            report += (f"\n\n**Random noise** (seed {random_seed}): the teacher alone, {steps} network evaluations "
                       f"in {1000 * (time.perf_counter() - tick):.0f} ms.")
        return gallery, decode(result["images"][0]), random_image, report

    with gr.Tab("Generate"):
        with gr.Row():
            label = quiet(prompt_box() if text
                          else gr.Dropdown(classes, value=classes[min(7, len(classes) - 1)], label="class"))
            count = quiet(gr.Slider(1, 16, value=8, step=1, label="images"))
            seed = quiet(gr.Number(value=0, label="seed (-1 = random)", precision=0))
            guidance = quiet(gr.Radio(scales, value=scales[0], label="guidance scale"))
            steps = quiet(gr.Slider(1, 8, value=1, step=1, label="student steps"))
        run = gr.Button("Generate", variant="primary", elem_id=f"generate-button{suffix}")
        gallery = gr.Gallery(label="samples", columns=8, height=360, object_fit="contain", format="png",
                             elem_id=f"generate-gallery{suffix}", elem_classes=["pixelated"])
        info = gr.Markdown()
        run.click(generate, [label, count, seed, guidance, steps, key_box], [gallery, info],
                  api_name=f"generate{suffix}")
    with gr.Tab("Best-of-N", visible=student.get("search", True)):
        with gr.Row():
            s_label = quiet(prompt_box() if text
                            else gr.Dropdown(classes, value=classes[min(3, len(classes) - 1)], label="class"))
            s_candidates = quiet(gr.Slider(2, 256, value=32, step=1, label="N candidates"))
            s_steps = quiet(gr.Slider(0, 200, value=50, step=1, label="teacher steps"))
            s_seed = quiet(gr.Number(value=0, label="first seed (-1 = random)", precision=0))
            s_guidance = quiet(gr.Radio(scales, value=scales[0], label="guidance scale"))
        s_run = gr.Button("Search", variant="primary", elem_id=f"search-button{suffix}")
        s_gallery = gr.Gallery(label="student candidates, best first (chosen outlined)", columns=8, height=360,
                               object_fit="contain", format="png", elem_classes=["pixelated"])
        with gr.Row():
            chosen_out = gr.Image(label="teacher from the chosen noise", format="png", elem_classes=["pixelated"])
            random_out = gr.Image(label="teacher from a random noise", format="png", elem_classes=["pixelated"])
        s_info = gr.Markdown()
        s_run.click(search, [s_label, s_candidates, s_steps, s_seed, s_guidance, key_box],
                    [s_gallery, chosen_out, random_out, s_info], api_name=f"search{suffix}")


def own_url(host: str, port: int) -> str:
    """The URL a server's own demo calls it at: the address it listens on, loopback where that is every interface."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def mount_demo(app, settings, model_cards: list[dict], path: str) -> None:
    """Mount the demo at `path` of the server app; its handlers call that server over HTTP with the
    visitor's key, never the server's own."""
    demo = build_demo(own_url(settings.host, settings.port), None, {m["kind"]: m for m in model_cards},
                      asks_for_key=bool(settings.api_keys))
    # no run history: Gradio's would keep every input in the visitor's browser storage, their API key included
    gr.mount_gradio_app(app, demo, path=path, css=CSS, max_file_size="1mb", run_history=False)
    served = app.router.lifespan_context  # the server's, which Gradio wrapped with its own

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with served(app) as state:
            with deleting_temp_files(demo, settings.ui_cache_seconds):
                yield state

    app.router.lifespan_context = lifespan


def launch(urls: str | list[str], host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None) -> None:
    demo = build_demo(urls, api_key)
    with deleting_temp_files(demo, DEFAULT_CACHE_SECONDS):
        demo.launch(server_name=host, server_port=port, css=CSS, run_history=False)  # as mount_demo's
