//! Bit-exact capture and restore of a list of [`Var`]s.
//!
//! A detached tensor shares its storage with the [`Var`] it came from in candle, so a
//! "saved" value taken with `detach()` would silently follow every later `Var::set`.
//! [`Snapshot`] therefore deep-copies each value with [`Tensor::copy`].

use candle_core::{Result, Tensor, Var};

/// Deep copies of the values of named vars, restorable bit for bit.
#[derive(Debug, Clone)]
pub struct Snapshot {
    entries: Vec<(String, Var, Tensor)>,
}

impl Snapshot {
    /// Deep-copies the current value of every var in `vars`.
    pub fn capture(vars: &[(String, Var)]) -> Result<Self> {
        let entries = vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.clone(), var.as_tensor().detach().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { entries })
    }

    /// Writes the captured values back into their vars.
    pub fn restore(&self) -> Result<()> {
        for (name, var, saved) in &self.entries {
            var.set(saved).map_err(|e| {
                candle_core::Error::Msg(format!("snapshot: restoring var {name} failed: {e}"))
            })?;
        }
        Ok(())
    }

    /// The captured values, in capture order (not aliased with the vars).
    pub fn values(&self) -> impl Iterator<Item = &Tensor> {
        self.entries.iter().map(|(_, _, t)| t)
    }

    /// Number of captured vars.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn restore_undoes_set_even_though_detach_aliases() -> Result<()> {
        let var = Var::from_slice(&[1.5f64, -2.0, 0.1], 3, &Device::Cpu)?;
        let aliased = var.as_tensor().detach();
        let snap = Snapshot::capture(&[("w".to_string(), var.clone())])?;
        var.set(&Tensor::new(&[9.0f64, 9.0, 9.0], &Device::Cpu)?)?;
        // The detached tensor followed the set: the reason for deep copies.
        assert_eq!(aliased.to_vec1::<f64>()?, vec![9.0; 3]);
        snap.restore()?;
        assert_eq!(var.as_tensor().to_vec1::<f64>()?, vec![1.5, -2.0, 0.1]);
        assert_eq!(snap.len(), 1);
        Ok(())
    }
}
