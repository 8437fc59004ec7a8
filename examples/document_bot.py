"""A document bot: page images -> typed invoice extraction with a zoom tool -> structured results kept in memory.

    python examples/document_bot.py [PAGE.png ...] [--db documents.db] [--model auto]
    python examples/document_bot.py --list --db documents.db

Each page is one agent run (and one stored conversation). The model sees the page, may call `zoom` to get a
region of it back enlarged (the crop enters the next request as real pixels), and records what it read with
`record_invoice`, whose argument is a Pydantic `Invoice`: dates, currency codes, line arithmetic and the total
are validated, and a mismatch goes back to the model as a retry naming the field. Every call and result is
committed by the store as the run goes; the accepted invoice is also put in the conversation's metadata, so
`load_invoices(store)` (or `--list`) gets the typed results back.

Without page paths it draws a sample invoice with PIL (`--sample-out` saves it). Only Phi-4-multimodal sees
images. When the chosen model cannot (SmolLM2, which `auto` picks offline when no Phi-4 weights are on this
machine), the example says so and runs the tiny random-weight Phi-4: the image pipeline runs for real, but what
it writes is noise and no invoice is expected to pass validation.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, Field, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agent import Agent, ImagePart, Model, ModelSettings
from agent.events import FinalEvent, RetryEvent, ToolCallEvent, ToolResultEvent
from agent.exceptions import MMAgentError, RunError, UserError
from agent.messages import as_image_part
from agent.models.resolve import resolve_media_model
from memory import Store
from tools import ModelRetry, ToolContext, tool

SYSTEM = (
    "You extract invoices from page images into structured data. Read the page; where the print is small, call "
    "zoom on that region to see it enlarged. Then call record_invoice once with the vendor, the invoice number, "
    "the date (YYYY-MM-DD), the currency as a 3-letter ISO code, every line item and the total, exactly as "
    "printed. If it is rejected, fix the fields the message names and call it again. Finish with one short "
    "sentence."
)
PROMPT = "Extract the invoice on this page."
MAX_ZOOM_SIDE = 1344  # pixels: at most 3x3 Phi-4 crops for one zoomed region

# ---------------------------------------------------------------- the typed result


class LineItem(BaseModel):
    """One line of an invoice."""

    description: str = Field(min_length=1)
    quantity: float = Field(gt=0)
    unit_price: float = Field(ge=0)
    amount: float = Field(description="quantity x unit_price, as printed")

    @model_validator(mode="after")
    def _amount_matches(self) -> LineItem:
        expected = self.quantity * self.unit_price
        if abs(expected - self.amount) > 0.01:
            raise ValueError(
                f"line {self.description!r}: {self.quantity:g} x {self.unit_price:.2f} = {expected:.2f}, "
                f"not {self.amount:.2f}"
            )
        return self


class Invoice(BaseModel):
    """An invoice as printed on the page."""

    vendor: str = Field(min_length=1, description="who issued the invoice")
    invoice_number: str = Field(min_length=1)
    date: dt.date = Field(description="issue date, YYYY-MM-DD")
    currency: str = Field(pattern="^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR")
    line_items: list[LineItem] = Field(min_length=1)
    total: float

    @model_validator(mode="after")
    def _total_matches(self) -> Invoice:
        lines = sum(item.amount for item in self.line_items)
        if abs(lines - self.total) > 0.01:
            raise ValueError(f"the line items add up to {lines:.2f}, not the total {self.total:.2f}")
        return self


# ---------------------------------------------------------------- tools


@dataclass
class Session:
    """What the tools work on: the pages, the page being read, and the invoices accepted so far."""

    pages: list[Image.Image]
    page: int = 0
    invoices: dict[int, Invoice] = field(default_factory=dict)


Fraction = Annotated[float, Field(ge=0, le=1)]


def crop_region(page: Image.Image, left: float, top: float, right: float, bottom: float, scale: float) -> Image.Image:
    """The region of `page` between the given fractions of its width and height, enlarged `scale` times."""
    width, height = page.size
    box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
    region = page.crop(box)
    factor = min(scale, MAX_ZOOM_SIDE / max(region.size))
    size = (max(1, round(region.width * factor)), max(1, round(region.height * factor)))
    return region.resize(size, Image.Resampling.LANCZOS)


@tool
def zoom(
    ctx: ToolContext,
    left: Fraction,
    top: Fraction,
    right: Fraction,
    bottom: Fraction,
    scale: Annotated[float, Field(ge=1, le=4)] = 2.0,
) -> list[Any]:
    """Look closer at a region of the current page: returns that region as an enlarged image.

    Args:
        left: left edge, as a fraction of the page width (0 = left side, 1 = right side).
        top: top edge, as a fraction of the page height (0 = top, 1 = bottom).
        right: right edge, as a fraction of the page width.
        bottom: bottom edge, as a fraction of the page height.
        scale: magnification.
    """
    if right - left < 0.02 or bottom - top < 0.02:
        raise ModelRetry("the region is empty or too thin: right must exceed left and bottom exceed top")
    session: Session = ctx.deps
    region = crop_region(session.pages[session.page], left, top, right, bottom, scale)
    return [
        f"Region {left:.2f},{top:.2f} to {right:.2f},{bottom:.2f} of the page, {region.width}x{region.height}:",
        region,
    ]


@tool
def record_invoice(ctx: ToolContext, invoice: Invoice) -> str:
    """Record the invoice read from the current page (validated: line arithmetic and total must agree).

    Args:
        invoice: every field exactly as printed.
    """
    session: Session = ctx.deps
    session.invoices[session.page] = invoice
    return (
        f"Recorded invoice {invoice.invoice_number} from {invoice.vendor}: {len(invoice.line_items)} line items, "
        f"total {invoice.total:.2f} {invoice.currency}."
    )


TOOLS: list[Callable[..., Any]] = [zoom, record_invoice]

# ---------------------------------------------------------------- the sample page


def sample_invoice() -> Image.Image:
    """A one-page invoice drawn with PIL: header, three line items, total, and small print."""
    page = Image.new("RGB", (850, 1100), "white")
    draw = ImageDraw.Draw(page)

    def font(size: int) -> Any:
        return ImageFont.load_default(size=size)

    draw.text((60, 50), "Nordlys Office Supplies AS", fill="black", font=font(34))
    draw.text((60, 95), "Storgata 12, 0155 Oslo, Norway", fill="dimgray", font=font(18))
    draw.text((560, 50), "INVOICE", fill="navy", font=font(40))
    for row, (label, value) in enumerate(
        [("Invoice no.", "INV-2026-0147"), ("Date", "2026-11-02"), ("Currency", "EUR")]
    ):
        draw.text((560, 110 + 28 * row), f"{label}: {value}", fill="black", font=font(18))
    draw.text((60, 200), "Bill to: Fjord Analytics Ltd, 4 Harbour Road, Bergen", fill="black", font=font(20))
    top = 270
    draw.rectangle((60, top, 790, top + 40), fill="#dde4f0")
    for x, head in ((70, "Description"), (470, "Qty"), (560, "Unit price"), (690, "Amount")):
        draw.text((x, top + 10), head, fill="black", font=font(18))
    items = [("A4 paper, 500 sheets", 10, 4.50), ("Ballpoint pens, box of 50", 2, 12.00), ("Desk lamp", 1, 39.90)]
    for i, (name, qty, price) in enumerate(items):
        y = top + 55 + 40 * i
        draw.text((70, y), name, fill="black", font=font(18))
        draw.text((470, y), str(qty), fill="black", font=font(18))
        draw.text((560, y), f"{price:.2f}", fill="black", font=font(18))
        draw.text((690, y), f"{qty * price:.2f}", fill="black", font=font(18))
    total = sum(q * p for _, q, p in items)
    y = top + 55 + 40 * len(items) + 20
    draw.line((60, y, 790, y), fill="black", width=2)
    draw.text((560, y + 15), "Total", fill="black", font=font(22))
    draw.text((690, y + 15), f"{total:.2f}", fill="black", font=font(22))
    draw.text((60, 1040), "Payment within 30 days to IBAN NO93 8601 1117 947. Thank you.", fill="gray", font=font(11))
    return page


SAMPLE_INVOICE = Invoice(
    vendor="Nordlys Office Supplies AS",
    invoice_number="INV-2026-0147",
    date=dt.date(2026, 11, 2),
    currency="EUR",
    line_items=[
        LineItem(description="A4 paper, 500 sheets", quantity=10, unit_price=4.5, amount=45.0),
        LineItem(description="Ballpoint pens, box of 50", quantity=2, unit_price=12.0, amount=24.0),
        LineItem(description="Desk lamp", quantity=1, unit_price=39.9, amount=39.9),
    ],
    total=108.9,
)
"""What `sample_invoice()` shows, as a correct extraction would record it."""

# ---------------------------------------------------------------- the model


def load_model(spec: str, echo: Callable[[str], None] = print) -> tuple[Model, bool]:
    """The model to run, and whether its weights are random (see `resolve_media_model`)."""
    return resolve_media_model(spec, "see images", echo=echo)


# ---------------------------------------------------------------- the bot


@dataclass
class PageResult:
    """What one page produced."""

    source: str
    conversation_id: str
    invoice: Invoice | None
    calls: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the run ended without an answer, if it did


async def extract_page(
    agent: Agent,
    store: Store,
    session: Session,
    source: str,
    *,
    random_weights: bool = False,
    echo: Callable[[str], None] = print,
) -> PageResult:
    """Run the agent on `session.page`; store the accepted invoice with its conversation."""
    page = session.pages[session.page]
    metadata: dict[str, Any] = {"kind": "invoice", "source": source, "page": session.page + 1}
    cid = store.create_conversation(title=f"page {session.page + 1}: {source}", metadata=metadata)
    result = PageResult(source=source, conversation_id=cid, invoice=None)
    try:
        async for event in agent.run_stream(PROMPT, images=[page], conversation_id=cid, deps=session):
            if isinstance(event, ToolCallEvent):
                result.calls.append(event.call.name)
                echo(f"  tool call  : {event.call.name}({str(event.call.arguments)[:160]})")
            elif isinstance(event, ToolResultEvent):
                images = sum(isinstance(p, ImagePart) for p in event.result.content)
                echo(f"  tool result: {event.result.text[:160]}" + (f" [+{images} image]" if images else ""))
            elif isinstance(event, RetryEvent):
                echo(f"  retry      : {event.retry.message[:200]}")
            elif isinstance(event, FinalEvent):
                echo(f"  answer     : {_shown(event.result.output, random_weights)}")
    except RunError as exc:
        result.stopped = str(exc)
        echo(f"  stopped    : {exc}")
    result.invoice = session.invoices.get(session.page)
    if result.invoice is not None:
        metadata["invoice"] = result.invoice.model_dump(mode="json")
        store.update_conversation(cid, title=f"invoice {result.invoice.invoice_number}", metadata=metadata)
    return result


async def extract_documents(
    model: Model,
    store: Store,
    pages: Sequence[Image.Image],
    sources: Sequence[str],
    *,
    random_weights: bool = False,
    console: Console | None = None,
) -> list[PageResult]:
    """Extract every page in turn, with a progress bar; each page is its own stored conversation.

    With random weights (the tiny Phi-4), each model turn is cut short (noise needs no more), and the first step
    must call `zoom`: grammar-constrained decoding makes even noise a valid call, so the crop really comes back
    into the context as an image (a whole `record_invoice` call would not fit the short budget).
    """
    console = console or Console(highlight=False, markup=False, soft_wrap=True)
    agent = Agent(
        model,
        tools=TOOLS,
        system_prompt=SYSTEM,
        memory=store,
        max_steps=6,
        settings=ModelSettings(max_tokens=128, tool_choice="zoom") if random_weights else ModelSettings(max_tokens=600),
    )
    session = Session(pages=list(pages))
    results: list[PageResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pages", total=len(pages))
        for index, source in enumerate(sources):
            session.page = index
            progress.console.print(f"page {index + 1}: {source}")
            echo = progress.console.print
            results.append(await extract_page(agent, store, session, source, random_weights=random_weights, echo=echo))
            progress.advance(task)
    return results


def _shown(text: str, random_weights: bool) -> str:
    """Text to print: noise from random weights is cut short and labelled."""
    if random_weights:
        return f"{text[:60]!r}{'...' if len(text) > 60 else ''} (random weights: this text is noise)"
    return text[:300]


def load_invoice(store: Store, conversation_id: str) -> Invoice | None:
    """The invoice accepted in a stored conversation, validated again, or None."""
    data = store.conversation(conversation_id).metadata.get("invoice")
    return None if data is None else Invoice.model_validate(data)


def load_invoices(store: Store) -> list[tuple[str, Invoice]]:
    """Every stored (conversation id, invoice), newest first."""
    found = []
    for info in store.list_conversations(limit=None):
        if info.metadata.get("kind") == "invoice" and "invoice" in info.metadata:
            found.append((info.id, Invoice.model_validate(info.metadata["invoice"])))
    return found


def _print_invoices(invoices: Sequence[tuple[str, Invoice]], console: Console) -> None:
    for cid, invoice in invoices:
        console.print(
            f"{cid[:12]}  {invoice.invoice_number}  {invoice.date}  {invoice.vendor}  "
            f"{len(invoice.line_items)} lines  {invoice.total:.2f} {invoice.currency}"
        )


def open_existing(db: str) -> Store:
    """Open a store that must already exist (a plain path that is missing is an error, not a new file)."""
    if "://" not in db and not Path(db).is_file():
        raise UserError(f"no store at {db!r}: extract a page first, or pass --db")
    return Store(db)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Extract typed invoices from page images; keep them in memory.")
    parser.add_argument("pages", nargs="*", type=Path, help="PNG/JPEG page images (default: a drawn sample invoice)")
    parser.add_argument("--db", default="documents.db", help="memory store: SQLite file (default documents.db)")
    parser.add_argument("--model", default="auto", help="auto | phi4 | smollm2 | tiny-phi4 | folder | hub id | URL")
    parser.add_argument("--sample-out", type=Path, help="also save the drawn sample invoice to this PNG")
    parser.add_argument("--list", action="store_true", help="list the invoices stored in --db, then exit")
    args = parser.parse_args(argv)
    console = Console(highlight=False, markup=False, soft_wrap=True)  # plain lines, however narrow the terminal
    if args.list:
        with open_existing(args.db) as store:
            invoices = load_invoices(store)
        _print_invoices(invoices, console)
        if not invoices:
            console.print(f"no invoices stored in {args.db}")
        return 0 if invoices else 1
    if args.pages:
        pages = [as_image_part(p).to_pil() for p in args.pages]  # bad paths fail here, before a model loads
        sources = [p.name for p in args.pages]
    else:
        pages, sources = [sample_invoice()], ["sample invoice (drawn)"]
        if args.sample_out:
            pages[0].save(args.sample_out)
    model, random_weights = load_model(args.model, echo=console.print)
    console.print(f"model: {model.name}")
    with Store(args.db) as store:
        results = await extract_documents(model, store, pages, sources, random_weights=random_weights, console=console)
        done = [(r.conversation_id, r.invoice) for r in results if r.invoice is not None]
    console.print(f"{len(done)} of {len(results)} page(s) gave a valid invoice; every run is stored in {args.db}")
    _print_invoices(done, console)
    if random_weights:
        console.print("(random weights: the pipeline ran end to end, but the model's words are noise)")
        return 0
    return 0 if len(done) == len(results) else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except MMAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
