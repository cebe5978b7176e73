"""The students: one cohort member's step in two halves around the exchange (:mod:`.student`) and how its forward and
backward run on its device (:mod:`.compute`). Their models and data come from the registries of
:mod:`rdml_dist.models` and :mod:`rdml_dist.data`."""
