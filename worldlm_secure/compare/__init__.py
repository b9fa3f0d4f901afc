"""`worldlm-secure compare`: privacy-enhancing-technology trade-off studies over a grid of policies.

`load_grid` reads a grid file (a base world and the variations to cross), `run_study` runs every cell
through `simulate` with the real protections and writes compare.json, compare.csv, plots and a
Markdown summary.
"""

from worldlm_secure.compare.grid import Cell, Grid, load_grid
from worldlm_secure.compare.study import StudyResult, run_study

__all__ = ["Cell", "Grid", "StudyResult", "load_grid", "run_study"]
