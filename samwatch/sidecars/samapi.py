"""samapi's request bodies as sidecars: where each samapi key lands in the native form.

A samapi request body saved as JSON (minus ``b64img``) is a valid sidecar; :func:`fold_samapi_form`
rewrites its keys before validation, so the rest of samwatch only ever sees the native ``Sidecar``.
"""

from __future__ import annotations

from typing import Any

from samwatch.sidecars.schema import AutomaskParams, Sidecar

_AUTOMASK_KEYS = frozenset(AutomaskParams.model_fields) - {"output_type"}
_VIDEO_KEYS = {"axes", "plane_position", "start_frame_idx", "max_frame_num_to_track", "objs"}
_PROMPT_KEYS = {"bbox", "point_coords", "point_labels", "b64mask", "mask"}

#: samapi body key -> where it lands in the native form (documented by ``samwatch schema``).
SAMAPI_KEYS: dict[str, str] = {
    "type": "model",
    "bbox": "prompts[0].bbox",
    "point_coords": "prompts[0].points",
    "point_labels": "prompts[0].point_labels",
    "b64mask": "prompts[0].b64mask",
    "text_prompt": "text (boxes then read as xywh: box_format xywh)",
    "reset_prompts": "ignored: every job starts from a fresh state",
    **{key: f"automask.{key}" for key in sorted(_AUTOMASK_KEYS)},
    "output_type": "output_type (and automask.output_type for automask jobs)",
    **{key: f"video.{key}" for key in sorted(_VIDEO_KEYS - {'objs'})},
    "objs": "video.objects",
}
_REFUSED_KEYS = {
    "b64img": "the image is the file next to the sidecar (or its 'image' key); remove b64img",
    "b64imgs": "frames come from the stack, video or name.frames/ folder; remove b64imgs",
    "dirname": "frames come from the stack, video or name.frames/ folder; remove dirname",
}


def _without_nulls(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


def fold_samapi_form(data: dict[str, Any]) -> dict[str, Any]:
    """Rewrite samapi body keys into the native form; native keys pass unchanged.

    A null means absent, at the top and inside samapi's ``objs`` objects: samapi's pydantic
    bodies serialise every unset optional key (``point_coords``, ``b64mask``, ...) as null.
    """
    data = _without_nulls(data)
    if isinstance(data.get("objs"), dict):
        data["objs"] = {
            frame: [_without_nulls(obj) if isinstance(obj, dict) else obj for obj in objs] if isinstance(objs, list) else objs
            for frame, objs in data["objs"].items()
        }
    for key, advice in _REFUSED_KEYS.items():
        if key in data:
            raise ValueError(f"{key}: {advice}")
    prompt = {key: data.pop(key) for key in list(data) if key in _PROMPT_KEYS}
    if prompt:
        if "point_coords" in prompt:
            prompt["points"] = prompt.pop("point_coords")
        data["prompts"] = [prompt, *data.get("prompts", [])]
    automask = {key: data.pop(key) for key in list(data) if key in _AUTOMASK_KEYS}
    if automask:
        if "output_type" in data:
            automask["output_type"] = data["output_type"]
        data["automask"] = {**automask, **(data.get("automask") or {})}
    video = {key: data.pop(key) for key in list(data) if key in _VIDEO_KEYS}
    if video:
        if "objs" in video:
            video["objects"] = video.pop("objs")
        data["video"] = {**video, **(data.get("video") or {})}
    if "text_prompt" in data:
        data["text"] = data.pop("text_prompt")
        data.setdefault("box_format", "xywh")
    data.pop("reset_prompts", None)
    return data


def sidecar_json_schema() -> dict[str, Any]:
    schema = Sidecar.model_json_schema(by_alias=False)
    schema["x-samapi-keys"] = SAMAPI_KEYS
    schema["x-refused-keys"] = _REFUSED_KEYS
    schema["x-samapi-keys"]["checkpoint_url"] = (
        "selects the registered weights with that URL; any other URL is refused, never fetched"
    )
    return schema
