import FarmgateWire

/// The distinct sensors a batch's readings name, in order of first use, and each reading's slot among them. What a
/// store decides per sensor (its row, its quantity and resolution, whether its readings are refused) is then an array
/// by slot, and each reading's sensor id is hashed once: hashing ids (a set of the batch's sensors, then three or four
/// dictionary lookups per reading) took a tenth of the SQLite writer's time over a backlog.
struct BatchSensorSlots {
    /// The distinct sensors, in order of first use.
    private(set) var sensors: [SensorID] = []
    /// Each reading's slot in ``sensors``, in the batch's order.
    private(set) var ofReading: [Int] = []
    private var slotOf: [SensorID: Int] = [:]

    init(_ readings: [Reading]) {
        ofReading.reserveCapacity(readings.count)
        for reading in readings {
            if let slot = slotOf[reading.sensor] {
                ofReading.append(slot)
            } else {
                slotOf[reading.sensor] = sensors.count
                ofReading.append(sensors.count)
                sensors.append(reading.sensor)
            }
        }
    }

    /// Whether a reading of the batch names `sensor`.
    func uses(_ sensor: SensorID) -> Bool { slotOf[sensor] != nil }

    /// How many distinct sensors the readings name.
    var count: Int { sensors.count }

    /// ``SensorPlacement`` of every slot.
    func placements(
        conflicts: [SensorID: (registered: String, sent: Quantity)], sensorRows: [SensorID: Int64], overLimit: Set<SensorID>, sensorLimit: Int
    ) -> [SensorPlacement] {
        sensors.map { SensorPlacement($0, conflicts: conflicts, sensorRows: sensorRows, overLimit: overLimit, sensorLimit: sensorLimit) }
    }
}
