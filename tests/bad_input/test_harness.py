"""The harness itself: a usage error through the real entry point and in-process read the same."""


def test_usage_error_is_one_line_in_process_and_in_a_child(cli, expect_error):
    for subprocess in (False, True):
        result = cli("screen", "--model", "x.safetensors", subprocess=subprocess)
        expect_error(result, 2, "--data")  # 2: usage error
