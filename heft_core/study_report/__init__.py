"""The report of a study: from its runs' recorded outcomes to numbers, verdicts, tables and charts.

:class:`RunOutcome` is one run as recorded (a run directory, and the database row when the app
ran it). :func:`study_report` turns a spec and its outcomes into a :class:`StudyReport`: per arm,
accuracy over seeds with each seed's Wilson interval, "yes" share, cost (trainable parameters,
tokens, seconds, estimated FLOPs); the majority-class baseline and each run against it; the
contrasts with per-seed exact McNemar tests, a bootstrap interval over seeds and questions and a
verdict that follows from both; and how small a difference the evaluation could see at all.
:func:`write_report` writes it as Markdown, CSV, JSON and PNG charts, with the spec and every
per-question prediction, into one directory.

One module per concern: ``outcomes`` (runs as recorded), ``costs`` (tokens, FLOPs), ``rows``
(the report as plain data), ``build`` (numbers, contrasts, verdicts), ``markdown``, ``charts``
and ``files`` (the report directory).
"""

from heft_core.study_report.build import default_contrasts, study_report
from heft_core.study_report.charts import CHART_FILES, write_charts
from heft_core.study_report.costs import FLOPS_FORMULA, decoder_shape, tokens_by_stage, training_flops
from heft_core.study_report.files import SPEC_FILE, write_report
from heft_core.study_report.outcomes import RunOutcome
from heft_core.study_report.rows import ArmRow, ContrastRow, RunRow, SeedTest, StudyReport

__all__ = [
    "CHART_FILES",
    "FLOPS_FORMULA",
    "SPEC_FILE",
    "ArmRow",
    "ContrastRow",
    "RunOutcome",
    "RunRow",
    "SeedTest",
    "StudyReport",
    "decoder_shape",
    "default_contrasts",
    "study_report",
    "tokens_by_stage",
    "training_flops",
    "write_charts",
    "write_report",
]
