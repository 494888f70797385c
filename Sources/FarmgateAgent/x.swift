public enum PFarmgateAgent {}
