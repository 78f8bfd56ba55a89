"""The paper's experiments: one command per table (``cmafnet experiment tableN``).

* :mod:`~cmafnet.experiments.spec` -- ``RunSpec``, table/row data types, sharding;
* :mod:`~cmafnet.experiments.paper_tables` -- Tables 1-8 as data (rows, columns, figures), ``expand``;
* :mod:`~cmafnet.experiments.runner` -- skip finished / resume unfinished / evaluate;
* :mod:`~cmafnet.experiments.execute` -- the default training, evaluation and profiling of one run;
* :mod:`~cmafnet.experiments.results` -- a run's result file, typed (or why it cannot be read);
* :mod:`~cmafnet.experiments.aggregate` -- every table from its declared columns, and its figure;
* :mod:`~cmafnet.experiments.compute` -- the equal-compute view (``--match-compute``);
* :mod:`~cmafnet.experiments.cost` -- GPU-hour estimates for ``--list``.
"""

from cmafnet.experiments.paper_tables import TABLES, expand
from cmafnet.experiments.spec import RunSpec, parse_shard, select_shard

__all__ = ["TABLES", "RunSpec", "expand", "parse_shard", "select_shard"]
