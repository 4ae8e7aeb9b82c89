"""Data preparation for the DRG recipe: case files in the recipe's JSONL format.

    mimic.py              MIMIC-IV + MIMIC-IV-Note -> train/test case files (credentialed data, never shipped)
    csv_rows.py           MIMIC's CSV files read row by row, each malformed record dropped with its line
    course.py             the "brief hospital course" section of a discharge summary
    synthetic.py          synthetic cases labelled by a real MS-DRG grouper (drgpy), for the demo and tests
    synthetic_render.py   their note text; synthetic_vocab.py: the word lists it draws from
"""
