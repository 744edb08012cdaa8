"""`flowmap bench stages`: what each stage of a request costs at the sizes users serve, with random
weights of the real shapes: the denoiser (SiT-S/2, B/2 and XL/2 shapes on 4x32x32 latents), the VAE
decoder (the Stable Diffusion AutoencoderKL and a tiny decoder, 256 and 512 px) and the image encoders
(png, jpeg, webp; every candidate library). Writes docs/stages.{md,json,png}."""

from __future__ import annotations

import io
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from flowmap.reports import pyplot, save_figure, write_report


@dataclass
class StagesBenchConfig:
    sizes: tuple[int, ...] = (256, 512)  # image sides in pixels
    small_sizes: tuple[int, ...] = (8, 128)  # grey images as class bundles serve them (8x8 digits, x16)
    encode_images: int = 16  # images per encoder measurement
    out: str = "docs/stages"  # writes OUT.md, OUT.json and OUT.png


def photo(side: int, grey: bool = False) -> np.ndarray:
    """A real photograph (scikit-learn's sample image), resized to side x side, [H, W, C] uint8:
    encoders behave on photographs as they do on generated images, not as on noise or flat colour."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("china.jpg")).resize((side, side), Image.BICUBIC)
    return np.asarray(image.convert("L"))[..., None] if grey else np.asarray(image)


def encoder_candidates() -> dict[str, callable]:
    """name -> encode(pixels [H, W, 3] uint8) -> bytes, for every library installed here."""
    from PIL import Image

    from server.imaging import png_bytes

    def pillow(fmt, **options):
        def encode(pixels):
            buffer = io.BytesIO()
            Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, format=fmt, **options)
            return buffer.getvalue()
        return encode

    candidates = {
        "png: our writer (zlib 6)": png_bytes,
        "png: Pillow (level 6)": pillow("PNG"),
        "png: Pillow (level 1)": pillow("PNG", compress_level=1),
        "jpeg q90: Pillow": pillow("JPEG", quality=90),
        "webp q90: Pillow (method 4)": pillow("WEBP", quality=90),
        "webp q90: Pillow (method 0)": pillow("WEBP", quality=90, method=0),
    }
    try:
        import simplejpeg

        def simple(subsampling):
            return lambda p: simplejpeg.encode_jpeg(np.ascontiguousarray(p), quality=90,
                                                    colorspace="GRAY" if p.shape[2] == 1 else "RGB",
                                                    colorsubsampling=subsampling)

        candidates["jpeg q90: simplejpeg (4:4:4)"] = simple("444")
        candidates["jpeg q90: simplejpeg (4:2:0)"] = simple("420")
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG

        turbo = TurboJPEG()
        # pixel format RGB (0) or grey (6), subsampling 4:2:0 (2) or grey (3)
        candidates["jpeg q90: PyTurboJPEG (4:2:0)"] = lambda p: turbo.encode(
            np.ascontiguousarray(p), quality=90, pixel_format=0 if p.shape[2] == 3 else 6,
            jpeg_subsample=2 if p.shape[2] == 3 else 3)
    except (ImportError, RuntimeError, OSError):  # the package, or the libjpeg-turbo it loads, is missing
        pass
    return candidates


def encoder_costs(config: StagesBenchConfig) -> list[dict]:
    """Per encoder and size: ms per image, bytes per image, and the speed-up of two threads over one
    (near 2 on two cores when the encoder releases the GIL)."""
    rows = []
    for side, grey in [(side, True) for side in config.small_sizes] + [(side, False) for side in config.sizes]:
        images = [photo(side, grey)] * config.encode_images
        for name, encode in encoder_candidates().items():
            encode(images[0])
            tick = time.perf_counter()
            sizes = [len(encode(image)) for image in images]
            one = time.perf_counter() - tick
            with ThreadPoolExecutor(2) as pool:
                tick = time.perf_counter()
                list(pool.map(encode, images))
                two = time.perf_counter() - tick
            rows.append({"encoder": name, "side": side, "grey": grey,
                         "ms_per_image": round(1000 * one / len(images), 4), "bytes": int(np.mean(sizes)),
                         "two_thread_speedup": round(one / two, 2)})
    return rows


def run_stages_bench(config: StagesBenchConfig, progress: bool = True) -> dict:
    say = print if progress else (lambda *a, **k: None)
    say("[bench stages] image encoders")
    report = {
        "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "encoders": encoder_costs(config),
    }
    write_report(report, config.out, _plot, render_stages_markdown)
    return report


def render_stages_markdown(report: dict, plot_name: str) -> str:
    lines = [
        "# What each stage costs",
        "",
        f"Written by `flowmap bench stages` on {report['machine']['cpus']} CPUs ({report['machine']['platform']}); "
        "one run, the machine shared: compare within a table, not across runs.",
        "",
        "## Image encoders",
        "",
        "A photograph resized to each size, encoded over and over; two threads on the same images tell "
        "whether the encoder releases the GIL (about 2x on two cores if it does, about 1x if not).",
        "",
        "| encoder | image | ms / image | bytes | 2 threads vs 1 |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report["encoders"]:
        image = f"{row['side']} px {'grey' if row['grey'] else 'RGB'}"
        lines.append(f"| {row['encoder']} | {image} | {row['ms_per_image']} | {row['bytes']} "
                     f"| {row['two_thread_speedup']}x |")
    return "\n".join(lines + ["", f"![stage costs]({plot_name})", ""])


def _plot(report: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    side = max(report["config"]["sizes"])
    rows = [r for r in report["encoders"] if r["side"] == side and not r["grey"]]
    ax.barh([r["encoder"] for r in rows], [r["ms_per_image"] for r in rows], color="tab:blue")
    ax.set_xlabel(f"ms per {side} px image")
    ax.invert_yaxis()
    save_figure(fig, path)
