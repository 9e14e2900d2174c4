"""Images on disk: verified before they are trusted, saved so that a crash never leaves half of
one, and tagged with where they came from.

* :mod:`~runner.images.verify`: every image checked whole under bounds (a cut file, a
  decompression bomb or the wrong size is refused); JPEG and WebP by full decodes on a few
  threads of their own whatever the concurrency, PNG by :mod:`~runner.images.pngcheck`, which
  walks the chunks and inflates the image data to its end without decoding pixels;
* :mod:`~runner.images.files`: atomic, durable writes through temp files named so that no final
  file can look like one; the start-up sweep of leftovers; finding and hashing a job's image;
* :mod:`~runner.images.provenance`: the job id, prompt, model and size written into the PNG,
  JPEG or WebP container without re-encoding the pixels;
* :mod:`~runner.images.saving`: the one step that turns the client's temp file into a job's
  image (verify, check the size, tag, write), run by the pool in a worker thread.

References the manifest names are verified here too, before anything is sent.
"""
