"""Documents: PDF pages rendered as images with pypdfium2, with their embedded text layer.

pypdfium2 binds PDFium, the PDF engine of Chromium, which is fuzzed continuously for the browser and so is
built to meet hostile files. Its wheels carry PDFium itself (no system library, no Ghostscript or poppler to
install), it renders fast, and its licences (Apache-2.0 or BSD-3-Clause for the binding, BSD-3-Clause and
Apache-2.0 for PDFium) suit a MIT project, unlike PyMuPDF's AGPL.

Caps: a document of more than `max_pages` pages is refused before a page is rendered, and a page is rendered
at `dpi` but never with more than `max_pixels` pixels (a poster page is scaled down to fit, not refused).
PDFium is not thread-safe: render from one thread at a time.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent.exceptions import MediaError, UserError
from agent.ingest._segments import Page

if TYPE_CHECKING:
    import pypdfium2

MAX_PAGES = 2000
"""The default cap on a document's page count."""

MAX_PAGE_PIXELS = 36 * 448 * 448
"""The default cap on a rendered page: 36 crops of 448x448 pixels (7.2 megapixels), the most Phi-4 looks at."""


def render_pages(
    path: str | os.PathLike[str],
    *,
    dpi: float = 144,
    max_pages: int = MAX_PAGES,
    max_pixels: int = MAX_PAGE_PIXELS,
) -> Iterator[Page]:
    """The pages of the PDF at `path`, in order, each rendered as a PNG image.

    The document is opened and checked when this is called; pages are rendered one at a time as the iterator
    is consumed, and the document is closed when it is exhausted or closed.

    Args:
        path: the PDF file.
        dpi: resolution (144 dpi makes an A4 page 1191x1684 pixels).
        max_pages: a document with more pages is refused.
        max_pixels: a page that would render larger at `dpi` is rendered at a lower resolution that fits.

    Raises:
        MediaError: the file is missing, not a PDF, corrupt, encrypted with a password, or over `max_pages`;
            or a page cannot be rendered (raised from the iterator).
        UserError: bad arguments, or pypdfium2 is missing.
    """
    if dpi <= 0 or max_pages < 1 or max_pixels < 1:
        raise UserError(
            f"render_pages needs dpi > 0, max_pages >= 1, max_pixels >= 1; got {dpi}, {max_pages}, {max_pixels}"
        )
    document = _open(path)
    try:
        count = len(document)
        if count > max_pages:
            raise MediaError(f"{os.fspath(path)}: has {count} pages, over the limit of {max_pages} (max_pages)")
        if count < 1:
            raise MediaError(f"{os.fspath(path)}: has no pages")
    except BaseException:
        document.close()
        raise
    return _pages(document, path, count, dpi, max_pixels)


def page_count(path: str | os.PathLike[str]) -> int:
    """How many pages the PDF at `path` has.

    Raises:
        MediaError: the file is missing, not a PDF, corrupt or encrypted with a password.
        UserError: pypdfium2 is missing.
    """
    document = _open(path)
    try:
        return len(document)
    finally:
        document.close()


def _open(path: str | os.PathLike[str]) -> pypdfium2.PdfDocument:
    try:
        import pypdfium2
    except ImportError as exc:
        raise UserError(f"rendering PDF pages needs pypdfium2: pip install 'mmagent[ingest]' ({exc})") from exc
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise MediaError(f"{name}: no such file" if not os.path.exists(name) else f"{name}: is not a file")
    try:
        document = pypdfium2.PdfDocument(name)
    except pypdfium2.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise MediaError(f"{name}: the PDF is encrypted (it needs a password)") from exc
        raise MediaError(f"{name}: not a readable PDF: {_reason(exc)}") from exc
    except Exception as exc:
        raise MediaError(f"{name}: cannot open the PDF: {_reason(exc)}") from exc
    with contextlib.suppress(Exception):  # without forms a document still renders, less its filled-in fields
        document.init_forms()
    return document


def _pages(
    document: pypdfium2.PdfDocument, path: str | os.PathLike[str], count: int, dpi: float, max_pixels: int
) -> Iterator[Page]:
    from agent.messages import ImagePart

    try:
        for index in range(count):
            try:
                page = document[index]
                try:
                    width, height = page.get_size()
                    scale = _scale(width, height, dpi, max_pixels)
                    bitmap = page.render(scale=scale)
                    image = ImagePart.from_pil(bitmap.to_pil())
                    bitmap.close()
                    text = _text(page)
                finally:
                    page.close()
            except MediaError:
                raise
            except Exception as exc:
                raise MediaError(f"{os.fspath(path)}: cannot render page {index + 1}: {_reason(exc)}") from exc
            yield Page(number=index + 1, image=image, width=float(width), height=float(height), text=text)
    finally:
        document.close()


def _text(page: Any) -> str:
    """The page's text layer (PDFium's reading order), newlines normalised; "" when it has none or is broken."""
    try:
        layer = page.get_textpage()
        try:
            text = str(layer.get_text_range())
        finally:
            layer.close()
    except Exception:  # a broken text layer must not cost the page its image
        return ""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")).strip()


def _scale(width: float, height: float, dpi: float, max_pixels: int) -> float:
    """Pixels per point: `dpi`/72, lowered so that the page has at most `max_pixels` pixels."""
    if not (width > 0 and height > 0 and math.isfinite(width * height)):
        raise MediaError(f"the page is {width}x{height} points: nothing to render")
    scale = dpi / 72
    if math.ceil(width * scale) * math.ceil(height * scale) > max_pixels:
        scale = math.sqrt(max_pixels / (width * height)) * 0.999
        while math.ceil(width * scale) * math.ceil(height * scale) > max_pixels and scale > 1e-6:
            scale *= 0.99
    return scale


def _reason(exc: BaseException) -> str:
    text: Any = str(exc) or type(exc).__name__
    return " ".join(str(text).split())
