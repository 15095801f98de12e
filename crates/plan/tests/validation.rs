//! Leave-one-model-out on ML.ENERGY's v3 chat measurements: for every model, fit the
//! efficiencies without its rows, predict them, and compare.

#[test]
fn leave_one_model_out_median_errors_are_within_15_percent() {
    let data = souverain_plan::mlenergy::dataset();
    assert!(data.rows.len() > 300, "{} rows known", data.rows.len());
    let v = data.leave_one_model_out();
    println!("{}", v.table());
    assert!(v.per_model.len() >= 15);
    assert!(
        v.tokens_per_s_median_err <= 0.15,
        "tokens/s median error {:.3}",
        v.tokens_per_s_median_err
    );
    assert!(
        v.joules_per_token_median_err <= 0.15,
        "J/token median error {:.3}",
        v.joules_per_token_median_err
    );
}
