"""The seven QA benchmarks of the SAPO and Search-R1 papers, by their FlashRAG names."""

SINGLE_HOP = ("nq", "triviaqa", "popqa")
MULTI_HOP = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
DATASETS = SINGLE_HOP + MULTI_HOP

# Column headers in tables, as the papers print them.
DISPLAY = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
           "2wikimultihopqa": "2Wiki", "musique": "Musique", "bamboogle": "Bamboogle"}
