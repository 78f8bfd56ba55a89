"""The paper's experiments: one command per table (``cmafnet experiment tableN``).

* :mod:`~cmafnet.experiments.spec` -- ``RunSpec``, table/row data types, sharding;
* :mod:`~cmafnet.experiments.paper_tables` -- Tables 1-8 as data, ``expand``;
* :mod:`~cmafnet.experiments.runner` -- skip finished / resume unfinished / evaluate;
* :mod:`~cmafnet.experiments.execute` -- the default training, evaluation and profiling of one run;
* :mod:`~cmafnet.experiments.aggregate`, :mod:`~cmafnet.experiments.layout`,
  :mod:`~cmafnet.experiments.figures` -- the paper's layout and figures;
* :mod:`~cmafnet.experiments.cost` -- GPU-hour estimates for ``--list``.
"""

from cmafnet.experiments.paper_tables import TABLES, expand
from cmafnet.experiments.spec import RunSpec, parse_shard, select_shard

__all__ = ["TABLES", "RunSpec", "expand", "parse_shard", "select_shard"]
