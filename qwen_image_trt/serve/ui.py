"""`qitrt serve --ui`: a Gradio page at /ui on the same server, through the same engine and batcher (no second
model copy): a request from the page is one more request in the queue, batched with API traffic.

Two tabs: text to image (on a text-to-image checkpoint) and edit (upload one or several images, a mask for
inpaint, strength): what an edit runs as follows from the checkpoint as on POST /v1/images/edits (img2img or
inpaint on Qwen-Image, edit on Qwen-Image-Edit, 1-3 images on Edit-Plus). With `--lora-dir`, both tabs have a LoRA
picker (the served adapters, listed again each time the page loads) and one scale for the picked ones. The API key, when set, protects the page too: open /ui?key=KEY once and a same-site
cookie carries it (serve/guard.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.models.pipelines import pipeline_kind
from qwen_image_trt.serve.adapters import UnknownAdapter
from qwen_image_trt.serve.protocol import ImageRequest, check_params
from qwen_image_trt.serve.state import ServeError

UI_PATH = "/ui"
SIZES = ("1024x1024", "1328x1328", "1664x928", "928x1664", "1472x1140", "1140x1472", "512x512", "256x256", "128x128",
         "64x64")


def size_choices(cfg, limits) -> list[str]:
    """The usual Qwen-Image sizes the engine's profile accepts, the server's default first."""
    out = [cfg.default_size]
    for s in SIZES:
        w, h = (int(x) for x in s.split("x"))
        tokens = (w // 16) * (h // 16)
        if (s not in out and limits.width[0] <= w <= limits.width[1] and limits.height[0] <= h <= limits.height[1]
                and limits.image_tokens[0] <= tokens <= limits.image_tokens[1]):
            out.append(s)
    return out


def caption(p) -> str:
    neg = f" | negative: {p.negative_prompt}" if p.negative_prompt else ""
    edit = ""
    if p.kind != "text-to-image":
        edit = f" | {p.kind} of {len(p.images)} image(s)" + (f", strength {p.strength:g}" if p.strength else "")
    if p.loras:
        edit += " | LoRA " + ", ".join(f"{name}:{scale:g}" for name, scale in p.loras)
    return (f"{p.prompt}{neg}{edit} | {p.width}x{p.height}, {p.steps} steps, seed {p.seed}, CFG {p.true_cfg_scale:g}"
            if p.cfg else f"{p.prompt}{edit} | {p.width}x{p.height}, {p.steps} steps, seed {p.seed}")


def _b64_file(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def health_text(engine) -> str:
    h = engine.health()
    workers = ", ".join(f"{w['device']} {'ready' if w['ready'] else 'not ready'}"
                        f"{' (busy)' if w['in_flight'] else ''}" for w in h["workers"])
    return f"**Server:** {h['status']} · queue {h['queue_length']} · workers: {workers}"


def mount_ui(app, cfg, limits, engine_of, adapters=None) -> None:
    """Mount the page on `app`. `engine_of()` returns the running Engine (made at startup, after mounting);
    `adapters`, the server's AdapterCatalog: with a --lora-dir, both tabs get a LoRA picker and a scale."""
    try:
        import gradio as gr
    except ImportError as e:
        raise QitrtError(f"--ui needs gradio: pip install 'qwen-image-trt[ui]' ({e})") from None
    from PIL import Image

    server_kind = pipeline_kind(cfg.checkpoint)

    async def run_request(fields: dict, edit: bool, history, progress):
        engine = engine_of()
        try:
            req = ImageRequest(**fields)
            params = await asyncio.to_thread(check_params, req, cfg, limits, engine.max_images, server_kind, edit)
            if params.loras:
                await asyncio.to_thread(adapters.check, params.loras)
            st = engine.accept(params)
        except InputError as e:
            raise gr.Error(f"{e.field}: {e.allowed} (got {e.value!r})") from None
        except UnknownAdapter as e:
            raise gr.Error(str(e)) from None
        except ServeError as e:
            raise gr.Error(e.message) from None
        t0 = time.monotonic()
        while not st.future.done():
            progress((st.step, params.steps), desc=f"{st.status}: step {st.step} of {params.steps}")
            await asyncio.wait([st.future], timeout=0.1)
        if st.error:
            raise gr.Error(st.error.message)
        images = [(Image.open(io.BytesIO(png)), caption(params) if i == 0 else caption(params).replace(
            f"seed {params.seed}", f"seed {params.seed + i}")) for i, png in enumerate(st.images)]
        history = images + (history or [])
        done = f"{len(images)} image(s) in {time.monotonic() - t0:.2f} s (queue {st.queue_s:.2f} s, batch of " \
               f"{st.batch_images} on worker {st.worker})"
        return history, history, done

    has_loras = adapters is not None and adapters.folder is not None

    def common(prompt, negative, size, steps, seed, scale, n, loras=None, lora_scale=1.0) -> dict:
        fields = dict(prompt=prompt or "", negative_prompt=negative or None, size=size, num_inference_steps=int(steps),
                      seed=int(seed), true_cfg_scale=float(scale), n=int(n))
        if loras:
            fields["lora"] = [f"{name}:{float(lora_scale):g}" for name in loras]
        return fields

    async def generate(prompt, negative, size, steps, seed, scale, n, loras, lora_scale, history,
                       progress=gr.Progress()):
        return await run_request(common(prompt, negative, size, steps, seed, scale, n, loras, lora_scale), False,
                                 history, progress)

    async def edit(files, mask, strength, prompt, negative, size, steps, seed, scale, n, loras, lora_scale, history,
                   progress=gr.Progress()):
        paths = [f if isinstance(f, str) else getattr(f, "name", f) for f in (files or [])]
        fields = common(prompt, negative, size, steps, seed, scale, n, loras, lora_scale)
        fields["image"] = [_b64_file(p) for p in paths]
        if mask:
            fields["mask"] = _b64_file(mask)
        if server_kind == "text-to-image" or mask:  # img2img / inpaint / edit-inpaint take a strength
            fields["strength"] = float(strength)
        return await run_request(fields, True, history, progress)

    sizes = size_choices(cfg, limits)
    lo, hi = limits.steps[0], min(limits.steps[1], cfg.max_steps)
    def settings(prefix: str):
        """The fields both tabs share; element ids prefixed per tab."""
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{prefix}-prompt")
        negative = gr.Textbox(label="Negative prompt (turns CFG on)", elem_id=f"{prefix}-negative")
        with gr.Row():
            size = gr.Dropdown(sizes, value=sizes[0], label="Size (WxH)")
            steps = gr.Slider(lo, hi, value=min(max(cfg.steps_default, lo), hi), step=1, label="Steps")
            seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
            scale = gr.Slider(1.0, 10.0, value=4.0, step=0.5, label="CFG scale")
            n = gr.Slider(1, max(1, min(cfg.max_n, 4)), value=1, step=1, label="Images")
        if not has_loras:  # states are not API parameters: the page's API is the same as before adapters existed
            return [prompt, negative, size, steps, seed, scale, n, gr.State([]), gr.State(1.0)]
        with gr.Row():
            loras = gr.Dropdown(adapters.names(), value=[], multiselect=True, label="LoRA adapters",
                                elem_id=f"{prefix}-loras")
            lora_scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA scale")
        pickers.append(loras)
        return [prompt, negative, size, steps, seed, scale, n, loras, lora_scale]

    pickers: list = []  # the LoRA dropdowns, refreshed when a page loads (files may have been added)
    what_edit = {"text-to-image": "img2img, or inpaint with a mask", "edit": "Qwen-Image-Edit (edit-inpaint with a "
                 "mask)", "edit-plus": "Qwen-Image-Edit-Plus: 1 to 3 images",
                 "qwen-image-2.1": "Qwen-Image-2.1: 1 to 3 images, no mask",
                 "qwen-image-2.1-turbo": "Qwen-Image-2.1-Turbo: 1 to 3 images, no mask"}.get(server_kind, server_kind)
    generates = server_kind in ("text-to-image", "qwen-image-2.1", "qwen-image-2.1-turbo")
    masks = server_kind not in ("edit-plus", "qwen-image-2.1", "qwen-image-2.1-turbo")  # members without a mask
    with gr.Blocks(title="qitrt serve") as page:
        gr.Markdown("## Qwen-Image on qitrt")
        status = gr.Markdown(elem_id="qitrt-health")
        history = gr.State([])
        with gr.Tab("Text to image", visible=generates):
            fields = settings("qitrt")
            run = gr.Button("Generate", variant="primary", elem_id="qitrt-generate")
            info = gr.Markdown(elem_id="qitrt-info")
            gallery = gr.Gallery(label="Gallery (newest first)", columns=4, format="png", elem_id="qitrt-gallery")
        with gr.Tab("Edit", elem_id="qitrt-edit-tab"):
            gr.Markdown(f"Runs as {what_edit}.")
            with gr.Row():
                files = gr.File(label="Input image(s)", file_count="multiple", file_types=["image"],
                                elem_id="qitrt-edit-images")
                mask = gr.Image(label="Mask (white = repaint; optional)", type="filepath", image_mode="L",
                                elem_id="qitrt-edit-mask", visible=masks)
            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (img2img, inpaint)",
                                 visible=masks)
            edit_fields = settings("qitrt-edit")
            edit_run = gr.Button("Edit", variant="primary", elem_id="qitrt-edit-run")
            edit_info = gr.Markdown(elem_id="qitrt-edit-info")
            edit_gallery = gr.Gallery(label="Gallery (newest first)", columns=4, format="png",
                                      elem_id="qitrt-edit-gallery")
        run.click(generate, [*fields, history], [gallery, history, info], api_name="generate")
        edit_run.click(edit, [files, mask, strength, *edit_fields, history], [edit_gallery, history, edit_info],
                       api_name="edit")
        gr.Timer(2.0).tick(lambda: health_text(engine_of()), None, status)
        page.load(lambda: health_text(engine_of()), None, status)
        for picker in pickers:
            page.load(lambda: gr.update(choices=adapters.names()), None, picker)
    gr.mount_gradio_app(app, page, path=UI_PATH, footer_links=["api"])
