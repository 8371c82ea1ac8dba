// AXI-Lite master tasks shared by the test benches (included inside a module that declares
// clk and the s_axil_* signals of nc_top). Signals change at falling edges; a handshake is
// judged 1 time unit after a falling edge, when the design's outputs have settled.
task axil_write(input [7:0] addr, input [31:0] data);
    begin
        @(negedge clk);
        s_axil_awaddr = addr; s_axil_awvalid = 1'b1;
        s_axil_wdata = data; s_axil_wstrb = 4'hF; s_axil_wvalid = 1'b1; s_axil_bready = 1'b1;
        #1;
        while (!s_axil_awready) begin @(negedge clk); #1; end
        @(negedge clk);
        s_axil_awvalid = 1'b0; s_axil_wvalid = 1'b0;
        while (!s_axil_bvalid) @(negedge clk);
        @(negedge clk);
        s_axil_bready = 1'b0;
    end
endtask

task axil_read(input [7:0] addr, output [31:0] data);
    begin
        @(negedge clk);
        s_axil_araddr = addr; s_axil_arvalid = 1'b1; s_axil_rready = 1'b1;
        #1;
        while (!s_axil_arready) begin @(negedge clk); #1; end
        @(negedge clk);
        s_axil_arvalid = 1'b0;
        while (!s_axil_rvalid) @(negedge clk);
        data = s_axil_rdata;
        @(negedge clk);
        s_axil_rready = 1'b0;
    end
endtask
