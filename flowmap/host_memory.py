"""What the serving path's array handling holds on the host at the users' sizes: a FLUX-shape request at 1024 px
(decoded float32 images of 3x1024x1024, text conditions of 512x4096), each operation beside its whole-array form
(the one the server used before). Each runs in a fresh process, and its peak is the resident memory it adds to
what its inputs already hold (Linux's VmHWM, reset just before; Linux commits a large array's pages as they are
written, so a join that frees each part once copied peaks at its output and one part).
`flowmap bench stages --parts memory` reports it."""

from __future__ import annotations

import asyncio

import numpy as np

from flowmap.timing import in_fresh_process
from server.engines import pad_rows, stack_rows
from server.imaging import join_rows, to_uint8
from server.stages import State, plan_search, rows_of

SEARCH_TOP_K = 4  # the search case's kept candidates


def search_candidates(count: int, image: tuple[int, ...], chunk: int | None = None):
    """The served search's Candidates stage over `count` candidates (FLUX latents: 16 channels at an eighth of the
    side; decoded, scored), run with engines that answer arrays of their outputs' sizes (the memory is the stage's:
    the engines' own is not the host's to bound), a chunk at a time, or all at once where `chunk` is `count` (the
    search before chunking)."""
    latent = (16, image[1] // 8, image[2] // 8)
    candidates = plan_search(latent, 1.0, count, 1, SEARCH_TOP_K, 0, None, decode=True)[0]
    candidates.chunk = chunk or candidates.chunk
    rng = np.random.default_rng(0)

    async def call(engine, feeds, ticket):
        if engine == "decoder":
            return np.full((len(feeds["latent"]), *image), 0.25, np.float32)  # written: its pages are committed
        if engine == "verifier":
            return rng.normal(size=(len(feeds["image"]), 10)).astype(np.float32)
        return feeds["x"] * np.float32(0.5)  # a student's jump: a new array of its input's size

    state = State(seeds=list(range(count)), labels=np.zeros(count, np.int64))
    asyncio.run(candidates.run(state, call, None))
    return state.x


def resident_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since it was last reset) of this process, in MB (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def with_added_peak_mb(run):
    """`run()`'s result and the resident MB it added to this process at its peak: the peak is reset first, since
    imports and inputs leave one behind (Linux's VmHWM)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the resident memory now
    before = resident_mb("VmRSS")
    result = run()
    return result, max(0.0, resident_mb("VmHWM") - before)  # an operation that frees pages may end a little below


def peak_mb(case: int, served: bool, shapes: dict) -> float:
    """In this process: build `case`'s inputs, then run its whole-array form or the served one, and return the
    resident MB the operation added at its peak."""
    name, what, data_mb, make, whole, ours = cases(**shapes)[case]
    inputs = make()
    return with_added_peak_mb(lambda: (ours if served else whole)(inputs))[1]


def cases(side: int, images: int, decoder_batch: int, condition: tuple[int, int], search: int) -> list[tuple]:
    """(operation, data, data MB, make inputs, whole-array form, served form) for each operation measured."""
    image = (3, side, side)
    rng = np.random.default_rng(0)
    one_image = rng.normal(0, 0.7, image).astype(np.float32)
    one_condition = rng.normal(0, 1, condition).astype(np.float32)
    image_mb = images * one_image.nbytes / 2**20

    def decoder_parts():  # what the batcher's futures hand over: each batch's output, copied out of the engine
        return [np.repeat(one_image[None], decoder_batch, axis=0) for _ in range(images // decoder_batch)]

    def decoded():
        return np.repeat(one_image[None], images, axis=0)

    def feeds():  # 60 rows of one prompt's condition from 2 requests, padded to the 64-row bucket
        return [np.broadcast_to(one_condition, (30, *condition)), np.broadcast_to(one_condition, (30, *condition))]

    def clip_copy(x):
        return np.clip(x, -1, 1)

    def clip_in_place(x):
        return np.clip(x, -1, 1, out=x)

    def quantise_whole(x):
        return np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)

    def conditions():
        return {"a photo of a cat": one_condition}

    def stacked(c):
        return np.stack([c["a photo of a cat"]] * search)

    def broadcast(c):
        return rows_of(c, ["a photo of a cat"] * search)

    condition_mb = one_condition.nbytes / 2**20
    return [
        ("join a request's decoder batches", f"{images} images of {side} px in {decoder_batch}-row batches", image_mb,
         decoder_parts, np.concatenate, join_rows),
        ("gather and pad a batch's conditions", f"60 rows of a {condition[0]}x{condition[1]} condition to 64",
         64 * condition_mb, feeds, lambda blocks: pad_rows(np.concatenate(blocks), 64),
         lambda blocks: stack_rows(blocks, 64)),
        ("clip the candidates for the verifier", f"{images} images of {side} px", image_mb, decoded, clip_copy,
         clip_in_place),
        ("quantise to 8-bit pixels for the encoders", f"{images} images of {side} px", image_mb, decoded,
         quantise_whole, to_uint8),
        ("one prompt's conditions for a search", f"{search} candidates, a {condition[0]}x{condition[1]} condition",
         search * condition_mb, conditions, stacked, broadcast),
        (f"a search's candidates, decoded and scored (top_k {SEARCH_TOP_K})",
         f"{search} candidates of {side} px from FLUX latents", search * one_image.nbytes / 2**20, lambda: search,
         lambda count: search_candidates(count, image, chunk=count), lambda count: search_candidates(count, image)),
    ]


def memory_rows(side: int = 1024, images: int = 64, decoder_batch: int = 8, condition: tuple[int, int] = (512, 4096),
                search: int = 256) -> list[dict]:
    """Each operation's peak beside its whole-array form's, in MB and as a multiple of the data it handles, each
    measured in a fresh process."""
    shapes = {"side": side, "images": images, "decoder_batch": decoder_batch, "condition": tuple(condition),
              "search": search}
    rows = []
    for case, (name, what, data_mb, *_) in enumerate(cases(**shapes)):
        whole, ours = (in_fresh_process(peak_mb, case, served, shapes) for served in (False, True))
        rows.append({"operation": name, "data": what, "data_mb": round(data_mb, 1), "whole_array_mb": round(whole, 1),
                     "served_mb": round(ours, 1), "whole_array_x": round(whole / data_mb, 2),
                     "served_x": round(ours / data_mb, 2)})
    return rows


def memory_table(rows: list[dict]) -> list[str]:
    """The operations as markdown rows."""
    lines = ["| operation | data | data MB | whole-array peak MB | served peak MB | whole-array x data "
             "| served x data |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['operation']} | {row['data']} | {row['data_mb']} | {row['whole_array_mb']} | "
                     f"{row['served_mb']} | {row['whole_array_x']} | {row['served_x']} |")
    return lines
