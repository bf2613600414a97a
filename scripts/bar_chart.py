#!/usr/bin/env python3
"""A horizontal bar chart as SVG, for docs/benchmarks.md (standard library only).

    python3 scripts/bar_chart.py --title "..." --unit s OUT.svg "label=value" ...

Each bar is labelled with its value; the first bar is the reference the others are compared
with ("1.00x", "3.1x slower").
"""

import argparse
import html


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("bars", nargs="+", help="label=value")
    parser.add_argument("--title", default="")
    parser.add_argument("--unit", default="")
    args = parser.parse_args()

    bars = []
    for item in args.bars:
        label, _, value = item.rpartition("=")
        if not label:
            parser.error(f"'{item}' is not label=value")
        bars.append((label, float(value)))
    largest = max(value for _, value in bars)
    reference = bars[0][1]

    width, left, right, bar_height, gap, top = 720, 230, 150, 26, 12, 44
    height = top + len(bars) * (bar_height + gap) + 10
    span = width - left - right
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15">{html.escape(args.title)}</text>',
    ]
    for i, (label, value) in enumerate(bars):
        y = top + i * (bar_height + gap)
        length = span * value / largest if largest > 0 else 0
        ratio = value / reference if reference > 0 else 0
        note = "reference" if i == 0 else f"{ratio:.2f}x"
        parts.append(f'<text x="{left - 8}" y="{y + bar_height * 0.68}" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar_height}" fill="#4c78a8"/>')
        parts.append(f'<text x="{left + length + 6:.1f}" y="{y + bar_height * 0.68}">'
                     f'{value:g} {html.escape(args.unit)} ({note})</text>')
    parts.append("</svg>")
    with open(args.out, "w", encoding="utf-8") as out:
        out.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
