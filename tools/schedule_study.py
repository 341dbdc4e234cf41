#!/usr/bin/env python
"""Schedule study (which training noise distribution is best for this data); the same command as
``latentdiff-schedule-study`` (see ``latentdiff.cli.schedule_study``).

    python tools/schedule_study.py GRID.yaml --out STUDY [--cells i-j] [--list] [--report-only]
"""
from latentdiff.cli.schedule_study import cli

if __name__ == "__main__":
    cli()
