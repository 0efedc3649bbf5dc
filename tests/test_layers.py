"""The import graph of sdgraph has no cycles, imports inside functions included.

import-linter (``lint-imports`` in tools/test.sh) checks the layer order; this test checks the
stronger property that no set of modules imports each other in a circle, which import-linter's
contracts do not express for a package and its own ``__init__``.
"""

from __future__ import annotations

import grimp
import networkx as nx


def _import_graph() -> nx.DiGraph:
    g = grimp.build_graph("sdgraph", exclude_type_checking_imports=True)  # annotations only: no run-time edge
    d = nx.DiGraph()
    for m in g.modules:
        d.add_node(m)
        d.add_edges_from((m, i) for i in g.find_modules_directly_imported_by(m))
    return d


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_import_graph()) if len(c) > 1]
    assert cycles == []


def test_ir_imports_nothing_above_it():
    d = _import_graph()
    above = ("sdgraph.passes", "sdgraph.targets", "sdgraph.pipeline", "sdgraph.cli", "sdgraph.calibration")
    reached = nx.descendants(d, "sdgraph.ir")
    for m in [n for n in d if n.startswith("sdgraph.ir.")]:
        reached |= nx.descendants(d, m)
    assert not [m for m in reached if m.startswith(above) or m == "sdgraph"]
