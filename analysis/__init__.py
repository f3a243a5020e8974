"""The layer sweep, regression and robustness statistics, pairwise leakage, reports and figures.

Imported as ``persona_geometry.analysis``. The JSON schema of ``persona-geometry analyze`` is
``SCHEMA`` (also ``Robustness.to_dict``).
"""

from persona_geometry.analysis.compare import (
    MetaAnalysis,
    SeedGroup,
    StudyComparison,
    StudyRecord,
    compare_studies,
    comparison_markdown,
    read_study,
    write_comparison,
)
from persona_geometry.analysis.figures import (
    check_static_export,
    cosine_heatmap,
    cosine_heatmap_grid,
    hero_scatter,
    sweep_curve,
    write_figure,
    write_figures,
)
from persona_geometry.analysis.leakage import LeakageCorrelation, leakage_correlation
from persona_geometry.analysis.report import (
    analyze_table,
    read_sweep_table,
    robustness_markdown,
    sweep_markdown,
    sweep_table,
    write_analysis,
)
from persona_geometry.analysis.robustness import (
    SCHEMA,
    CategoryFit,
    Correlation,
    HoldoutPrediction,
    Influence,
    LinearFit,
    LooCoverage,
    PartialSpearman,
    PooledCounts,
    Robustness,
    analyze,
    partial_spearman,
    pool_seeds,
    robustness_at_layer,
)
from persona_geometry.analysis.sweep import LayerSweep, layer_sweep
from persona_geometry.stats import wilson_interval

__all__ = [
    "SCHEMA",
    "CategoryFit",
    "Correlation",
    "HoldoutPrediction",
    "Influence",
    "LayerSweep",
    "LeakageCorrelation",
    "LinearFit",
    "LooCoverage",
    "MetaAnalysis",
    "PartialSpearman",
    "PooledCounts",
    "Robustness",
    "SeedGroup",
    "StudyComparison",
    "StudyRecord",
    "analyze",
    "analyze_table",
    "check_static_export",
    "compare_studies",
    "comparison_markdown",
    "cosine_heatmap",
    "cosine_heatmap_grid",
    "hero_scatter",
    "layer_sweep",
    "leakage_correlation",
    "partial_spearman",
    "pool_seeds",
    "read_study",
    "read_sweep_table",
    "robustness_at_layer",
    "robustness_markdown",
    "sweep_curve",
    "sweep_markdown",
    "sweep_table",
    "wilson_interval",
    "write_analysis",
    "write_comparison",
    "write_figure",
    "write_figures",
]
