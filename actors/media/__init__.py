"""The CPU stage's media stack, from a row's cell to the model's inputs.

- ``policy``: what a row's media path may reach (the trust boundary) and the bounded local read;
- ``fetch``: remote URLs read with time limits, retries and the size cap, ahead of the rows;
- ``limits``: the caps on each item's work, checked before the work (bytes, pixels, samples);
- ``decode``: a cell's bytes, path or array -> RGB pixels or 16 kHz mono audio;
- ``features``: the model's inputs (image crops and masks, log-mel features) computed on the CPU;
- ``chunks``: long audio split into overlapping windows and their texts stitched back.

Pure functions and plain classes: no Ray, no engine.
"""
