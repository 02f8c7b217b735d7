"""Pages people look at instead of reading logs: the label-mask view (which tokens are
trained) and the predictions table (image, reference, prediction, error). Self-contained HTML,
viewable in the MLflow UI's artifact browser."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

__all__ = ["label_mask_html", "predictions_html", "thumbnail_data_uri"]

_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
.tok{font-family:ui-monospace,monospace;white-space:pre-wrap;border-radius:3px;padding:0 1px}
.trained{background:#c8f0c8;outline:1px solid #5a5}
.masked{background:#eee;color:#777}
.image{background:#dde6ff;color:#447}
.sample{margin:1em 0;padding:.6em;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
.err{font-weight:bold}
</style>"""


def thumbnail_data_uri(path: str | None, max_side: int = 240) -> str:
    if not path or not Path(path).is_file():
        return ""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def label_mask_html(items: Sequence[Any], tokenizer: Any, image_token_id: int, title: str = "Label mask") -> str:
    """Every token of a few samples: green = trained (assistant answer + end of turn), grey =
    masked (system, prompt, padding), blue = image tokens (runs collapsed). A broken chat
    template shows at a glance: nothing green, or the prompt green."""
    parts = [
        f"<html><head><meta charset='utf-8'><title>{title}</title>{_STYLE}</head><body>",
        f"<h2>{html.escape(title)}</h2>",
    ]
    legend = ("trained", "trained"), ("masked", "masked"), ("image", "image tokens")
    parts.append("<p>" + " ".join(f"<span class='tok {cls}'>{text}</span>" for cls, text in legend) + "</p>")
    for item in items:
        trained = sum(1 for label in item.labels if label != -100)
        counts = f"(line {item.line}): {len(item.input_ids)} tokens, {trained} trained"
        parts.append(f"<div class='sample'><div><b>{html.escape(str(item.id))}</b> {counts}</div>")
        thumb = thumbnail_data_uri(item.images[0] if item.images else None)
        if thumb:
            parts.append(f"<img src='{thumb}' style='margin:.4em 0'/>")
        parts.append("<div>")
        i = 0
        while i < len(item.input_ids):
            tid = item.input_ids[i]
            if tid == image_token_id:
                j = i
                while j < len(item.input_ids) and item.input_ids[j] == image_token_id:
                    j += 1
                parts.append(f"<span class='tok image'>&lt;image x{j - i}&gt;</span>")
                i = j
                continue
            cls = "trained" if item.labels[i] != -100 else "masked"
            text = tokenizer.decode([tid])
            parts.append(f"<span class='tok {cls}'>{html.escape(text)}</span>")
            i += 1
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def predictions_html(rows: Sequence[dict[str, Any]], task: str, step: int | None, title: str = "Predictions") -> str:
    """The eval samples with the model's answers, worst first."""
    error_name = {"ocr_formula": "NED", "general_vqa": "1 - ANLS"}.get(task, "CER")
    parts = [
        f"<html><head><meta charset='utf-8'><title>{title}</title>{_STYLE}</head><body>",
        f"<h2>{html.escape(title)}</h2><p>task {task}, predictions at step {step}, {len(rows)} samples, "
        f"sorted by {error_name} (worst first)</p>",
        f"<table><tr><th>#</th><th>image</th><th>reference</th><th>prediction</th><th>{error_name}</th></tr>",
    ]
    for row in sorted(rows, key=lambda r: -r["error"]):
        thumb = thumbnail_data_uri(row.get("image"))
        img = f"<img src='{thumb}'/>" if thumb else ""
        parts.append(
            f"<tr><td>{html.escape(str(row.get('id')))}</td><td>{img}</td>"
            f"<td class='tok'>{html.escape(row['reference'])}</td><td class='tok'>{html.escape(row['prediction'])}</td>"
            f"<td class='err'>{row['error']:.3f}</td></tr>"
        )
    parts.append("</table></body></html>")
    return "".join(parts)
