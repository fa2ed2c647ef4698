"""Reports: figures (``plots``), one experiment's Markdown/HTML report (``render``) and the
summary across experiments (``summary``)."""
