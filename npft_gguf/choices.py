"""Fixed choices shared by the command line and the stages behind it. No imports, so the CLI can
build its options (and `--help`) from them without loading torch or gguf."""

# --bits N: the pure-RTN GGUF types of that width, best first (the first one every row length fits wins)
BITS = {2: ("q2_k",), 3: ("q3_k",), 4: ("q4_0",), 5: ("q5_0",), 6: ("q6_k", "q8_0"), 8: ("q8_0",)}
# auto: npft+imatrix where llama.cpp's importance-weighted rules exist for the type written, else npft
METHODS = ("auto", "npft", "rtn", "gptq", "npft+gptq", "owq", "imatrix", "npft+imatrix")
# the files of about the same size a user could get from llama.cpp instead (convert's closing comparison
# shows them beside the output, each with its size): same-size types, and the K mix of the width
PEERS = {"q4_0": ("iq4_nl", "q4_k_m"), "q4_1": ("iq4_nl", "q4_k_m"), "iq4_nl": ("q4_0", "q4_k_m"),
         "q5_0": ("q5_k_m",), "q5_1": ("q5_k_m",)}
# convert's default bound on its closing evaluation, in windows of --ctx for each file compared: 100 x 512
# tokens is about a sixth of WikiText-2's test text (the whole of it, for five or six files, was the longest
# stage of every real run: hours of llama.cpp on a CPU); --eval-chunks all for the whole text
EVAL_CHUNKS = 100
