"""The after-run views of an output folder, read through the store's views, never its tables.

- :mod:`~runner.outputs.ledger`: ``results.parquet`` / ``results.csv`` (one row per job of the
  manifest) and ``ledger.csv`` (one row per billed or possibly billed request), written at the
  end of every run;
- :mod:`~runner.outputs.report`: ``report.html``, the summary and contact sheet, written as a
  stream; its page's style and script are :mod:`~runner.outputs.report_page`, its thumbnail
  cache ``thumbs/`` is :mod:`~runner.outputs.thumbs`;
- :mod:`~runner.outputs.status`: ``image-runner status``, where a run stands, live or not;
- :mod:`~runner.outputs.export`: ``image-runner export``, the finished images as a Hugging Face
  dataset;
- :mod:`~runner.outputs.notify`: ``run --notify``, a run's summary POSTed to a webhook (it
  reads no store: the CLI hands it the summary).

Each view takes a store (:class:`~runner.store.views.Viewable`: its folder and its
:class:`~runner.store.views.Views`) and only reads it, so all of them are safe while a run writes.
"""
