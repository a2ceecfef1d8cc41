"""Drawing the level DAG: text always; SVG with graphviz or PNG with matplotlib when installed."""
from __future__ import annotations

import io
import shutil

import networkx as nx


class LevelDiagram:
    """The level DAG of a program. Prints as text; shows as SVG/PNG in Jupyter."""

    def __init__(self, graph: nx.MultiDiGraph):
        self.graph = graph

    def _label(self, n) -> str:
        a = self.graph.nodes[n]
        extra = f", {a['method']}" if a.get("method") else ""
        return f"{n}  ({a['params']} params, {a['steps']} step(s), {a['optimizer']}{extra})"

    def text(self) -> str:
        g = self.graph
        deps = {n: [v for _, v, k in g.out_edges(n, data="kind") if k == "depends_on"] for n in g}
        reads = {n: [v for _, v, k in g.out_edges(n, data="kind") if k == "reads"] for n in g}
        tops = [n for n in g if not any(k == "depends_on" for _, _, k in g.in_edges(n, data="kind"))]
        lines = []

        def visit(n, prefix, last, root):
            branch = "" if root else ("└─ " if last else "├─ ")
            lines.append(prefix + branch + self._label(n))
            child_prefix = prefix + ("" if root else ("   " if last else "│  "))
            if reads[n]:
                lines.append(child_prefix + "   reads " + ", ".join(reads[n]))
            for j, c in enumerate(deps[n]):
                visit(c, child_prefix, j == len(deps[n]) - 1, False)

        for t in tops:
            visit(t, "", True, True)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    __repr__ = __str__

    def dot(self) -> str:
        """The DAG in graphviz's dot language: solid depends_on edges, dashed reads edges."""
        lines = ["digraph levels {", '  rankdir=TB; node [shape=box, fontname="Helvetica"];']
        for n in self.graph:
            a = self.graph.nodes[n]
            lines.append(f'  "{n}" [label="{n}\\n{a["params"]} params · {a["steps"]} step(s)'
                         + (f'\\n{a["method"]}' if a.get("method") else "") + '"];')
        for u, v, k in self.graph.edges(data="kind"):
            style = "solid" if k == "depends_on" else "dashed"
            lines.append(f'  "{u}" -> "{v}" [style={style}, label="{k}"];')
        lines.append("}")
        return "\n".join(lines)

    def _repr_svg_(self):
        if shutil.which("dot") is None:
            return None
        try:
            import graphviz
        except ImportError:
            return None
        return graphviz.Source(self.dot()).pipe(format="svg").decode()

    def _repr_png_(self):
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError:
            return None
        fig = self.figure()
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)  # no pyplot: the notebook's backend stays as it was
        return buf.getvalue()

    def figure(self):
        """A matplotlib figure of the DAG, upper levels on top (made without pyplot)."""
        from matplotlib.figure import Figure
        g = self.graph
        deps = nx.DiGraph((u, v) for u, v, k in g.edges(data="kind") if k == "depends_on")
        deps.add_nodes_from(g)
        depth = {n: 0 for n in g}
        for n in nx.topological_sort(deps):
            for c in deps.successors(n):
                depth[c] = max(depth[c], depth[n] + 1)
        rows: dict = {}
        for n, d in depth.items():
            rows.setdefault(d, []).append(n)
        pos = {n: (i - (len(ns) - 1) / 2, -d) for d, ns in rows.items() for i, n in enumerate(ns)}
        fig = Figure(figsize=(2.5 + 2 * max(len(r) for r in rows.values()), 1.5 + 1.3 * len(rows)))
        ax = fig.subplots()
        for u, v, k in g.edges(data="kind"):
            (x0, y0), (x1, y1) = pos[u], pos[v]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="->", ls="-" if k == "depends_on" else "--",
                                        color="black" if k == "depends_on" else "tab:blue",
                                        connectionstyle="arc3,rad=0.0" if k == "depends_on" else "arc3,rad=0.3",
                                        shrinkA=22, shrinkB=22))
        for n, (x, y) in pos.items():
            a = g.nodes[n]
            label = f"{n}\n{a['params']} params, {a['steps']} step(s)" + (f"\n{a['method']}" if a.get("method") else "")
            ax.text(x, y, label, ha="center", va="center", bbox=dict(boxstyle="round", fc="white", ec="black"))
        ax.set_xlim(min(p[0] for p in pos.values()) - 1, max(p[0] for p in pos.values()) + 1)
        ax.set_ylim(min(p[1] for p in pos.values()) - 0.7, 0.7)
        ax.axis("off")
        ax.set_title("solid: depends_on   dashed: reads", fontsize=9)
        return fig
