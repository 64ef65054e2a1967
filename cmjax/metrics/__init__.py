"""Sample-quality metrics. Submodules are imported by name (`cmjax.metrics.frechet`, `cmjax.metrics.digits`),
so importing the package stays cheap and pulls in no model, dataset or weights."""
