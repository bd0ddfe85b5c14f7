from twisted.application.service import ServiceMaker
service_maker = ServiceMaker("smarthost", "smarthost.tap", "An authenticated SMTP smart host", "smarthost")
