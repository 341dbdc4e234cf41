"""The papers' math, no I/O: power spectra and WSNR (wsnr.txt Eq. 2-3), training noise distributions, their
shift rules and sampling grids (edm.txt Table 1, Eq. 5), distance statistics and the data-driven sigma_max (wsnr.txt
Eq. 6-8), preconditioning and the loss (edm.txt Eq. 7-8), classifier-free guidance."""
