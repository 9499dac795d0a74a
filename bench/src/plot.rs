//! What the charts (the bench's, the WAN lab's, the soak's) share beyond plotters.

/// The label of a tick on a category axis whose categories sit at 0.5, 1.5, 2.5 ...: the name of
/// the category at `at`, and nothing between categories (where plotters puts ticks too when asked
/// for twice as many labels as there are categories, so that one falls on each middle).
pub fn category_label(names: &[String], at: f64) -> String {
    let slot = at - 0.5;
    let i = slot.round();
    if (slot - i).abs() < 0.01 && i >= 0.0 {
        names.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn categories_are_named_at_their_middles_only() {
        let names = vec!["quic".to_string(), "tcp".to_string()];
        assert_eq!(super::category_label(&names, 0.5), "quic");
        assert_eq!(super::category_label(&names, 1.5), "tcp");
        assert_eq!(super::category_label(&names, 1.0), "");
        assert_eq!(super::category_label(&names, 2.5), "");
    }
}
