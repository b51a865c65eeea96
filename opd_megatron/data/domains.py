DOMAINS = {"addition": None, "reversal": None, "sorting": None}  # placeholder registry replaced by the data module
