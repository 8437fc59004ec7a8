"""A small MCP server (official SDK) with a tool that draws a bar chart: the image mmagent's agent then sees.

python examples/mcp_chart_server.py            # stdio, for `MCPTools.stdio(...)` / `mmagent run --mcp`
python examples/mcp_chart_server.py http 8123  # Streamable HTTP at http://127.0.0.1:8123/mcp
"""

from __future__ import annotations

import io
import sys

from mcp.server.mcpserver import Image, MCPServer
from PIL import Image as PILImage
from PIL import ImageDraw

server = MCPServer("charts")

SALES = {"Jan": 120, "Feb": 135, "Mar": 90, "Apr": 160, "May": 210, "Jun": 205}


@server.tool()
def monthly_sales() -> dict[str, int]:
    """Units sold per month this half-year, as numbers."""
    return SALES


@server.tool()
def sales_chart(highlight: str = "") -> Image:
    """A bar chart of units sold per month (PNG); `highlight` names a month to draw in red."""
    width, height, margin = 480, 320, 40
    chart = PILImage.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    top = max(SALES.values())
    step = (width - 2 * margin) // len(SALES)
    for i, (month, units) in enumerate(SALES.items()):
        x0 = margin + i * step + 8
        y0 = height - margin - int((height - 2 * margin) * units / top)
        draw.rectangle([x0, y0, x0 + step - 16, height - margin], fill="red" if month == highlight else "steelblue")
        draw.text((x0, height - margin + 6), month, fill="black")
        draw.text((x0, y0 - 14), str(units), fill="black")
    draw.line([margin, height - margin, width - margin, height - margin], fill="black")
    buffer = io.BytesIO()
    chart.save(buffer, format="PNG")
    return Image(data=buffer.getvalue(), format="png")


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
