from training import ensure_data


def test_present_data_is_found(capsys):
    assert ensure_data.main(["--no-install"]) == 0
    assert "Fashion-MNIST:" in capsys.readouterr().out


def test_missing_directory_says_how_to_fix(tmp_path, capsys):
    assert ensure_data.main(["--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err
    assert "VITSERVE_FASHION_MNIST" in err and "train-images-idx3-ubyte.gz" in err
