"""Metrics: FID / IS / sFID / precision-recall (``inception.py``), the digit classifier's scores
(``digits.py``), PSNR / SSIM (``image.py``), and the one Gaussian estimator and Fréchet distance
they share (``statistics.py``). Importing this package loads none of them (torch-fidelity is slow
to import)."""
