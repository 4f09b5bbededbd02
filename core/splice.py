"""Splicing visual embeddings into a padded text batch at the ``<image>`` placeholders.

The one place where visual tokens enter the LLM's input, for every LLM: each ``<image>``
token of sample ``b`` is replaced by the ``M`` rows of ``visual[b]``, the batch is re-padded
on the requested side, and labels at the visual positions are set to ``IGNORE_INDEX`` (prompt
positions already carry it from tokenisation). Positions are found from the tokens, never
assumed fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medvlsam2.core.errors import InputError

IGNORE_INDEX = -100


@dataclass
class SplicedBatch:
    """The LLM's input after splicing; every tensor is ``(B, T')`` (``inputs_embeds`` adds ``h``)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    token_ids: torch.Tensor  # text ids; ``image_token_id`` at visual positions, ``pad_id`` at padding
    visual_mask: torch.Tensor  # True where a visual embedding sits
    labels: torch.Tensor | None = None


def splice_visual_embeds(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    visual: torch.Tensor | None,
    image_token_id: int,
    *,
    labels: torch.Tensor | None = None,
    pad_id: int = 0,
    padding_side: str = "right",
) -> SplicedBatch:
    """Replace every ``<image>`` of sample ``b`` by ``visual[b]`` ``(M, h)`` and re-pad the batch.

    ``input_ids``/``attention_mask``/``labels`` are ``(B, T)`` with padding on either side
    (``attention_mask == 0``); ``text_embeds`` are the embeddings of ``input_ids`` ``(B, T, h)``.
    A sample without ``<image>`` stays text only; ``visual=None`` requires that of every sample.
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got '{padding_side}'")
    b, t = input_ids.shape
    if attention_mask.shape != (b, t) or text_embeds.shape[:2] != (b, t):
        raise InputError(
            f"splice: input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} "
            f"and text_embeds {tuple(text_embeds.shape)} disagree"
        )
    if labels is not None and labels.shape != (b, t):
        raise InputError(f"splice: labels {tuple(labels.shape)} do not match input_ids {(b, t)}")
    is_image = (input_ids == image_token_id) & attention_mask.bool()
    if visual is None:
        if is_image.any():
            raise InputError("splice: the prompt has an <image> placeholder but no visual embeddings were given")
    elif visual.ndim != 3 or visual.shape[0] != b or visual.shape[2] != text_embeds.shape[2]:
        raise InputError(
            f"splice: visual embeddings {tuple(visual.shape)} must be (B={b}, M, h={text_embeds.shape[2]})"
        )
    embeds_out, ids_out, vis_out, labels_out = [], [], [], []
    for i in range(b):
        keep = attention_mask[i].bool()
        ids, emb = input_ids[i][keep], text_embeds[i][keep]
        lab = labels[i][keep] if labels is not None else None
        where = (ids == image_token_id).nonzero().flatten().tolist()
        seg_e, seg_i, seg_v, seg_l = [], [], [], []
        start = 0
        for pos in [*where, len(ids)]:
            seg_e.append(emb[start:pos])
            seg_i.append(ids[start:pos])
            seg_v.append(torch.zeros(pos - start, dtype=torch.bool, device=ids.device))
            if lab is not None:
                seg_l.append(lab[start:pos])
            if pos < len(ids):
                m = visual.shape[1]  # type: ignore[union-attr]
                seg_e.append(visual[i].to(emb.dtype))  # type: ignore[index]
                seg_i.append(ids.new_full((m,), image_token_id))
                seg_v.append(torch.ones(m, dtype=torch.bool, device=ids.device))
                if lab is not None:
                    seg_l.append(lab.new_full((m,), IGNORE_INDEX))
            start = pos + 1
        embeds_out.append(torch.cat(seg_e))
        ids_out.append(torch.cat(seg_i))
        vis_out.append(torch.cat(seg_v))
        if lab is not None:
            labels_out.append(torch.cat(seg_l))
    length = max(len(x) for x in ids_out)

    def pad(rows: list[torch.Tensor], value: float | int | bool) -> torch.Tensor:
        out = []
        for row in rows:
            fill = row.new_full((length - len(row), *row.shape[1:]), value)
            out.append(torch.cat([row, fill] if padding_side == "right" else [fill, row]))
        return torch.stack(out)

    mask = pad([torch.ones(len(x), dtype=attention_mask.dtype, device=x.device) for x in ids_out], 0)
    return SplicedBatch(
        inputs_embeds=pad(embeds_out, 0.0),
        attention_mask=mask,
        token_ids=pad(ids_out, pad_id),
        visual_mask=pad(vis_out, False),
        labels=pad(labels_out, IGNORE_INDEX) if labels is not None else None,
    )
