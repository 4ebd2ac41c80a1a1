"""What crosses the boundary between the HTTP process and a worker: plain data, never pickle.

A message is a ZeroMQ multipart message: frame 0 is a UTF-8 JSON object with a "type", and any further frames are
raw binary blobs (encoded images or videos) that the JSON refers to by position: a `run` message's input images
(each item's `image_blobs` lists its frames' positions), a `result` message's outputs. JSON cannot run code when it is read, so a
compromised or confused peer can at worst send a wrong answer, never execute anything in the other process.

Server → worker: `run` (a batch of requests), `lora` (a LoRA operation), `cancel` (request ids), `shutdown`.
Worker → server: `ready` (model info, notes to log), `load_failed`, `progress` (after every denoising step),
`result`, `lora_result`, `error`, `batch_done`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any

from ditserve.config import SamplingParams

# Fields of SamplingParams that travel to the worker in the JSON (not output_type: the worker makes PIL images and
# encodes them; not input `images`: they travel as encoded image files in the blobs, see `WorkItem.input_images`).
_PARAM_FIELDS = (
    "prompt",
    "negative_prompt",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "seed",
    "num_frames",
    "fps",
    "num_images",
    "options",
    "max_sequence_length",
    "guidance_scale_2",
    "sampling_preset",
    "cache",
    "attention",
)


class ProtocolError(ValueError):
    """A message that does not follow this module's format (a bug on one side, never user input)."""


def params_to_dict(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in _PARAM_FIELDS}


def params_from_dict(data: dict) -> SamplingParams:
    return SamplingParams(**{name: data.get(name) for name in _PARAM_FIELDS if name in data})


@dataclass
class WorkItem:
    """One request as the worker sees it."""

    request_id: str
    params: dict  # params_to_dict(SamplingParams)
    output_format: str = "png"  # png, jpeg, webp for images; mp4 for videos
    task: str = "text-to-image"
    # Input images (edit and image-to-video requests) as encoded image files: raw blobs of the run message, the
    # JSON holding only how many each item has.
    input_images: list[bytes] = field(default_factory=list)

    def sampling_params(self) -> SamplingParams:
        """The request's SamplingParams, its input images decoded (RGB, or RGBA when they have alpha)."""
        params = params_from_dict(self.params)
        if not self.input_images:
            return params
        from PIL import Image

        images = []
        for blob in self.input_images:
            with Image.open(io.BytesIO(blob)) as image:
                images.append(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
        return params.replace(images=images)


@dataclass
class ModelInfo:
    """What the worker tells the server once the model is loaded, so requests can be validated without it."""

    name: str
    family: str
    tasks: list[str]
    spatial_multiple: int
    max_sequence_length_limit: int
    defaults: dict
    supports_batching: bool
    device: str
    dtype: str
    pid: int
    cost: dict | None = None  # cost.CostModel.to_dict(): what requests cost on this device; None if not measured
    frame_step: int | None = None  # video models: num_frames must be frame_step·k + 1 (the VAE's temporal packing)
    backend: str = "native"  # who runs the model: "native" (our DiT) or "diffusers" (the diffusers backend)
    memory_plan: dict | None = None  # accel.memory_plan.MemoryPlan.to_dict(): the offloads in effect


def encode(message: dict, blobs: list[bytes] | None = None) -> list[bytes]:
    if "type" not in message:
        raise ProtocolError("a message needs a 'type'")
    return [json.dumps(message, separators=(",", ":")).encode(), *(blobs or [])]


def decode(frames: list[bytes]) -> tuple[dict, list[bytes]]:
    if not frames:
        raise ProtocolError("empty message")
    try:
        message = json.loads(frames[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("header must be a JSON object with a string 'type'")
    return message, list(frames[1:])


def run_message(batch_id: str, items: list[WorkItem]) -> list[bytes]:
    """The items as JSON, their input images as blobs after it, item after item."""
    described = [{**dataclasses.asdict(i), "input_images": len(i.input_images)} for i in items]
    blobs = [blob for i in items for blob in i.input_images]
    return encode({"type": "run", "batch_id": batch_id, "items": described}, blobs)


def items_from(message: dict, blobs: list[bytes] | None = None) -> list[WorkItem]:
    blobs = list(blobs or [])
    try:
        items, start = [], 0
        for item in message["items"]:
            count = item.get("input_images", 0)
            if not isinstance(count, int) or count < 0 or start + count > len(blobs):
                raise ProtocolError(f"bad run message: {count!r} input images, {len(blobs) - start} blobs left")
            items.append(WorkItem(**{**item, "input_images": blobs[start : start + count]}))
            start += count
        return items
    except (KeyError, TypeError, AttributeError) as e:
        raise ProtocolError(f"bad run message: {e}") from None


def ready_message(info: ModelInfo, notes: list[str] | None = None) -> list[bytes]:
    """`notes`: what the server should log (a LoRA change a restarted worker could not redo)."""
    return encode({"type": "ready", "info": dataclasses.asdict(info), "notes": list(notes or [])})


def info_from(message: dict) -> ModelInfo:
    return ModelInfo(**message["info"])


def result_message(request_id: str, images: list[bytes], meta: dict[str, Any]) -> list[bytes]:
    """Outputs (encoded images, or one MP4 per clip) travel as raw frames 1..n; `meta` (seed, timings, peak memory)
    in the header."""
    return encode({"type": "result", "request_id": request_id, "num_images": len(images), **meta}, images)
