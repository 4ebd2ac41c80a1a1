"""Server mode: nodes that send work to a running `ditserve serve` over HTTP (its OpenAI-compatible API).

Each node takes the server's URL and API key as inputs. Images come back as PNG (b64) and become ComfyUI IMAGE
tensors; videos are jobs that the node polls (their progress drives ComfyUI's progress bar) and downloads as MP4,
decoded into an IMAGE batch of frames. Every failure becomes one line naming the input at fault or quoting the
server's own error message.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import torch

from .errors import NodeInputError

DEFAULT_URL = "http://127.0.0.1:30000"
POLL_SECONDS = 0.5


def _client(url: str, api_key: str, timeout: float):
    import httpx

    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise NodeInputError("server_url", f"{url!r} is not an http(s) URL, e.g. {DEFAULT_URL}")
    headers = {"Authorization": f"Bearer {api_key.strip()}"} if api_key.strip() else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


def _call(client, method: str, path: str, **kwargs):
    """One request; its failure as a NodeInputError that says what the server (or the network) said."""
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.TimeoutException:
        raise NodeInputError("server_url", f"{client.base_url} did not answer {path} in time") from None
    except httpx.HTTPError as e:
        raise NodeInputError("server_url", f"cannot reach a ditserve server at {client.base_url} ({e})") from None
    if response.status_code >= 400:
        raise NodeInputError(
            _field_of(response), f"the server refused {path} ({response.status_code}): {_message_of(response)}"
        )
    return response


def _message_of(response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") or response.text)[:500]
    except (json.JSONDecodeError, AttributeError):
        return response.text[:500]


def _field_of(response) -> str:
    if response.status_code == 401:
        return "api_key"
    try:
        return str(response.json().get("error", {}).get("param") or "request")
    except (json.JSONDecodeError, AttributeError):
        return "request"


def _png_to_tensor(data: bytes) -> torch.Tensor:
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _tensor_to_png(image: torch.Tensor) -> bytes:
    """One ComfyUI IMAGE ([H, W, C] in [0, 1]) as PNG bytes."""
    from PIL import Image

    array = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(payload: dict) -> torch.Tensor:
    return torch.stack([_png_to_tensor(base64.b64decode(d["b64_json"])) for d in payload["data"]])


# Connect a Set LoRA node's output here to run the generation after it (ComfyUI orders nodes by their links).
_AFTER = {"after": ("STRING", {"forceInput": True})}


def _server_inputs() -> dict:
    return {
        "server_url": ("STRING", {"default": DEFAULT_URL}),
        "api_key": ("STRING", {"default": ""}),
    }


def _sampling_inputs() -> dict:
    return {
        "prompt": ("STRING", {"multiline": True, "default": ""}),
        "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
        "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16}),
        "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16}),
        "steps": ("INT", {"default": 0, "min": 0, "max": 200, "tooltip": "0: the model's default"}),
        "guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "tooltip": "-1: the model's default"}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
    }


def _sampling_fields(prompt, negative_prompt, width, height, steps, guidance, seed) -> dict:
    if not prompt.strip():
        raise NodeInputError("prompt", "empty")
    fields = {"prompt": prompt, "size": f"{width}x{height}", "seed": int(seed)}
    if negative_prompt:
        fields["negative_prompt"] = negative_prompt
    if steps > 0:
        fields["num_inference_steps"] = int(steps)
    if guidance >= 0:
        fields["guidance_scale"] = float(guidance)
    return fields


class _ServerNode:
    CATEGORY = "ditserve/server"

    @staticmethod
    def progress(total: int):
        import comfy.utils

        return comfy.utils.ProgressBar(total)


class DitserveServerGenerateImage(_ServerNode):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_server_inputs(),
                **_sampling_inputs(),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16}),
            },
            "optional": _AFTER,
        }

    def generate(
        self, server_url, api_key, prompt, negative_prompt, width, height, steps, guidance, seed, batch_size, after=None
    ):
        body = {
            **_sampling_fields(prompt, negative_prompt, width, height, steps, guidance, seed),
            "n": batch_size,
            "response_format": "b64_json",
            "output_format": "png",
        }
        bar = self.progress(1)  # the images route answers once, when the images are done
        with _client(server_url, api_key, timeout=3600) as client:
            payload = _call(client, "POST", "/v1/images/generations", json=body).json()
        bar.update(1)
        return (_images(payload),)


class DitserveServerEditImage(_ServerNode):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_server_inputs(), "image": ("IMAGE",), **_sampling_inputs()}, "optional": _AFTER}

    def edit(
        self, server_url, api_key, image, prompt, negative_prompt, width, height, steps, guidance, seed, after=None
    ):
        fields = _sampling_fields(prompt, negative_prompt, width, height, steps, guidance, seed)
        fields.update(response_format="b64_json", output_format="png")
        files = [("image[]", (f"image{i}.png", _tensor_to_png(im), "image/png")) for i, im in enumerate(image)]
        bar = self.progress(1)
        with _client(server_url, api_key, timeout=3600) as client:
            data = {k: str(v) for k, v in fields.items()}
            payload = _call(client, "POST", "/v1/images/edits", data=data, files=files).json()
        bar.update(1)
        return (_images(payload),)


class DitserveServerGenerateVideo(_ServerNode):
    """Text-to-video, or image-to-video with `image` connected (sent as the job's `input_reference`)."""

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_server_inputs(),
                **_sampling_inputs(),
                "seconds": ("INT", {"default": 4, "min": 1, "max": 60}),
            },
            "optional": {"image": ("IMAGE",), **_AFTER},
        }

    def generate(
        self,
        server_url,
        api_key,
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance,
        seed,
        seconds,
        image=None,
        after=None,
    ):
        fields = {
            **_sampling_fields(prompt, negative_prompt, width, height, steps, guidance, seed),
            "seconds": str(seconds),
        }
        bar = self.progress(100)
        with _client(server_url, api_key, timeout=60) as client:
            if image is None:
                job = _call(client, "POST", "/v1/videos", json=fields).json()
            else:
                files = [("input_reference", ("input.png", _tensor_to_png(image[0]), "image/png"))]
                job = _call(
                    client, "POST", "/v1/videos", data={k: str(v) for k, v in fields.items()}, files=files
                ).json()
            done = 0
            while job["status"] not in ("completed", "failed", "cancelled"):
                time.sleep(POLL_SECONDS)
                job = _call(client, "GET", f"/v1/videos/{job['id']}").json()
                progress = int(job.get("progress") or 0)
                if progress > done:
                    bar.update(progress - done)
                    done = progress
            if job["status"] != "completed":
                error = job.get("error") or {}
                raise NodeInputError("request", f"video job {job['id']} {job['status']}: {error.get('message', error)}")
            content = _call(client, "GET", f"/v1/videos/{job['id']}/content").content
        bar.update(100 - done)
        return (_mp4_frames(content),)


def _mp4_frames(data: bytes) -> torch.Tensor:
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)


class DitserveServerSetLoRA(_ServerNode):
    """Activates LoRAs on the server (`POST /v1/set_lora`); an empty `lora_names` turns LoRA off. Paths are
    resolved inside the server's --lora-dir. Outputs the server's LoRA state as text; connect it to a generate
    node's optional `after` input so that the LoRA is set before that node runs."""

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_state",)
    FUNCTION = "set_lora"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_server_inputs(),
                "lora_names": (
                    "STRING",
                    {"default": "", "tooltip": "comma-separated files in the server's --lora-dir"},
                ),
                "strengths": ("STRING", {"default": "1.0", "tooltip": "one number, or one per LoRA, comma-separated"}),
            }
        }

    def set_lora(self, server_url, api_key, lora_names, strengths):
        names = [n.strip() for n in lora_names.split(",") if n.strip()]
        try:
            values = [float(s) for s in strengths.split(",") if s.strip()] or [1.0]
        except ValueError:
            raise NodeInputError("strengths", f"{strengths!r}: numbers separated by commas") from None
        if len(values) == 1:
            values *= max(1, len(names))
        if names and len(values) != len(names):
            raise NodeInputError("strengths", f"{len(values)} strengths for {len(names)} LoRAs")
        body = {
            "lora_nickname": [n.rsplit(".", 1)[0][:64] for n in names],
            "lora_path": names,
            "strength": values[: len(names)],
        }
        with _client(server_url, api_key, timeout=600) as client:
            state = _call(client, "POST", "/v1/set_lora", json=body).json()
        return (json.dumps(state),)


NODE_CLASS_MAPPINGS = {
    "DitserveServerGenerateImage": DitserveServerGenerateImage,
    "DitserveServerEditImage": DitserveServerEditImage,
    "DitserveServerGenerateVideo": DitserveServerGenerateVideo,
    "DitserveServerSetLoRA": DitserveServerSetLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DitserveServerGenerateImage": "ditserve Server: Generate Image",
    "DitserveServerEditImage": "ditserve Server: Edit Image",
    "DitserveServerGenerateVideo": "ditserve Server: Generate Video",
    "DitserveServerSetLoRA": "ditserve Server: Set LoRA",
}
