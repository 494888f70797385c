import Testing
@testable import FarmgateIngest
